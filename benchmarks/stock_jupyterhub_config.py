"""The baseline of the login benchmark: stock JupyterHub + GenericOAuthenticator.

Same identity provider, same local spawner and catalogue as labfleet; what
differs is everything labfleet adds on the hub side (discovery, group mapping,
pre-spawn refresh and membership check, token endpoint, log redaction).
Settings come from BENCH_* environment variables set by login_latency.py.
"""

import os

c = get_config()  # noqa: F821
env = os.environ
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = int(env["BENCH_PORT"])
c.JupyterHub.hub_port = int(env["BENCH_HUB_PORT"])
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env['BENCH_PROXY_PORT']}"
c.JupyterHub.db_url = f"sqlite:///{env['BENCH_STATE']}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = f"{env['BENCH_STATE']}/cookie_secret"
c.JupyterHub.cleanup_servers = True

c.JupyterHub.authenticator_class = "generic-oauth"
a = c.GenericOAuthenticator
issuer = env["BENCH_ISSUER"].rstrip("/")
a.authorize_url = f"{issuer}/authorize"
a.token_url = f"{issuer}/token"
a.userdata_url = f"{issuer}/userinfo"
a.client_id = env["BENCH_CLIENT_ID"]
a.client_secret = env["BENCH_CLIENT_SECRET"]
a.oauth_callback_url = f"http://127.0.0.1:{env['BENCH_PORT']}/hub/oauth_callback"
a.scope = ["openid", "profile", "email", "offline_access", "wlcg", "wlcg.groups"]
a.username_claim = "preferred_username"
a.allow_all = True
a.login_service = "INDIGO IAM"
a.enable_auth_state = True
c.CryptKeeper.keys = [env["BENCH_CRYPT_KEY"].encode()]

c.JupyterHub.spawner_class = "labfleet-local"
c.LocalGPUSpawner.catalogue_path = env["BENCH_CATALOGUE"]
c.LocalGPUSpawner.storage_root = env["BENCH_STORAGE"]
c.LocalGPUSpawner.cmd = [env["BENCH_SINGLEUSER"]]
c.LocalGPUSpawner.default_url = "/lab"
