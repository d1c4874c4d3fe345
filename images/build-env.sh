# Sourced by the Containerfiles' RUN steps that download (apt, pip, npm).
# The builder may hand in this host's CA bundle, pip configuration and apt
# settings as build-time secrets (`podman build --secret id=ca,src=...`, as
# `labfleet images build` does): podman mounts them under /run/secrets for the
# step only, so no layer keeps them. Without them (a build elsewhere, from a
# public base) the image's own CA bundle and defaults are used.
if [ -s /run/secrets/ca ]; then
  export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca \
    REQUESTS_CA_BUNDLE=/run/secrets/ca NODE_EXTRA_CA_CERTS=/run/secrets/ca
fi
if [ -s /run/secrets/pipconf ]; then
  export PIP_CONFIG_FILE=/run/secrets/pipconf
fi
if [ -s /run/secrets/aptconf ]; then
  export APT_CONFIG=/run/secrets/aptconf
fi
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
