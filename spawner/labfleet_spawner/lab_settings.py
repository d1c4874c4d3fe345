"""Platform-wide JupyterLab defaults for the notebooks labfleet starts (Jupyter news).

JupyterLab 4 asks every new user "Would you like to get notified about
official Jupyter news?" unless the setting ``fetchNews`` of
``@jupyterlab/apputils-extension:notification`` says otherwise. A platform
decides this for its users: labfleet writes the default into the notebook
environment's application settings directory,
``<prefix>/share/jupyter/lab/settings/overrides.d/labfleet.json``, which
JupyterLab reads for every user (any uid) before their own settings. A user
who wants news can still turn it on in their own settings; nothing is written
into users' homes.

- local mode: :class:`LabSettingsMixin` writes it before a server starts, in
  the environment of the spawner's ``jupyterhub-singleuser``;
- images: ``python -m labfleet_spawner.lab_settings never`` at build time
  writes it into the image's own environment (``images/*/Containerfile``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from traitlets import Enum, HasTraits, Unicode

from . import safefs

NOTIFICATION_PLUGIN = "@jupyterlab/apputils-extension:notification"
#: labfleet's choice -> JupyterLab's ``fetchNews`` value ("ask" is JupyterLab's own default)
NEWS_CHOICES = {"never": "false", "ask": "none", "always": "true"}
OVERRIDES_FILE = "labfleet.json"


def lab_overrides(jupyter_news: str) -> dict:
    """JupyterLab setting overrides for ``jupyter_news`` (never, ask, always); {} for none."""
    if jupyter_news not in NEWS_CHOICES:
        raise ValueError(f"jupyter_news must be one of {', '.join(NEWS_CHOICES)}")
    if jupyter_news == "ask":
        return {}
    settings: dict = {"fetchNews": NEWS_CHOICES[jupyter_news]}
    if jupyter_news == "never":
        # JupyterLab's check for a newer JupyterLab asks pypi.org from the notebook server
        # whatever fetchNews says; the platform, not its users, decides which version runs
        settings["checkForUpdates"] = False
    return {NOTIFICATION_PLUGIN: settings}


def app_settings_dir(prefix: str | os.PathLike) -> Path:
    """JupyterLab's application settings directory of the environment at ``prefix``."""
    return Path(prefix) / "share" / "jupyter" / "lab" / "settings"


def environment_prefix(command: str) -> Path | None:
    """The environment of an absolute ``<prefix>/bin/<program>`` path, else None."""
    path = Path(command)
    if not path.is_absolute() or path.parent.name != "bin":
        return None
    return path.parent.parent


def write_overrides(settings_dir: str | os.PathLike, overrides: dict) -> bool:
    """Make ``<settings_dir>/overrides.d/labfleet.json`` hold ``overrides`` ({}: no file).

    Written atomically, mode 0644 (every user's JupyterLab reads it); returns
    whether anything changed. Other files in ``overrides.d`` are left alone.
    """
    target = Path(settings_dir) / "overrides.d" / OVERRIDES_FILE
    if not overrides:
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        return True
    content = json.dumps(overrides, indent=2, sort_keys=True) + "\n"
    try:
        if target.read_text() == content:
            return False
    except OSError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".labfleet-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


class LabSettingsMixin(HasTraits):
    """Writes the platform's JupyterLab defaults before a local server starts.

    Mix in before the JupyterHub spawner class; needs ``cmd`` and ``log``.
    """

    jupyter_news = Enum(
        list(NEWS_CHOICES),
        "never",
        config=True,
        help="""Whether JupyterLab fetches official Jupyter news for the platform's users:
        ``never`` (no news, and no "Would you like to get notified about official
        Jupyter news?" popup for new users; no check for a newer JupyterLab either),
        ``always``, or ``ask`` (JupyterLab's own default: ask each user once). A
        default: users may change it in their own JupyterLab settings.

        Written into the notebook environment's JupyterLab settings
        (``overrides.d/labfleet.json`` in ``lab_app_settings_dir``), so it applies to
        everything that runs JupyterLab from that environment.
        """,
    )

    lab_app_settings_dir = Unicode(
        "",
        config=True,
        help="""JupyterLab's application settings directory of the notebooks' environment.

        Empty: ``<prefix>/share/jupyter/lab/settings`` of the environment whose
        ``bin/`` holds the spawner's command (``jupyterhub-singleuser``).
        """,
    )

    def _lab_settings_dir(self) -> Path | None:
        if self.lab_app_settings_dir:
            return Path(self.lab_app_settings_dir)
        command = shutil.which(self.cmd[0]) if self.cmd else None
        prefix = environment_prefix(os.path.abspath(command)) if command else None
        if prefix is None or not (prefix / "share" / "jupyter" / "lab").is_dir():
            return None
        return app_settings_dir(prefix)

    def ensure_lab_settings(self) -> None:
        """Write the defaults if they changed; a failure is logged, never fatal to a spawn.

        Nothing is written when the settings folder, or a folder on its way, is one a
        user could change (:func:`labfleet_spawner.safefs.check_private_folder`).
        """
        settings_dir = self._lab_settings_dir()
        if settings_dir is None:
            self.log.warning(
                "JupyterLab settings not written: no JupyterLab environment found for %s; "
                "set lab_app_settings_dir",
                self.cmd,
            )
            return
        try:
            # written as root: into a folder no user can change (nor anything on its way)
            safefs.check_private_folder(settings_dir)
            if write_overrides(settings_dir, lab_overrides(self.jupyter_news)):
                self.log.info(
                    "JupyterLab defaults (Jupyter news: %s) in %s", self.jupyter_news, settings_dir
                )
        except OSError as e:
            self.log.warning("Cannot write JupyterLab defaults into %s: %s", settings_dir, e)

    async def start(self):
        self.ensure_lab_settings()
        return await super().start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labfleet_spawner.lab_settings",
        description="Write the platform's JupyterLab defaults into an environment "
        "(container images do this at build time).",
    )
    parser.add_argument("jupyter_news", choices=list(NEWS_CHOICES))
    parser.add_argument(
        "--prefix", default=sys.prefix, help="the environment (default: this Python's)"
    )
    args = parser.parse_args(argv)
    settings_dir = app_settings_dir(args.prefix)
    write_overrides(settings_dir, lab_overrides(args.jupyter_news))
    print(f"JupyterLab defaults (Jupyter news: {args.jupyter_news}) in {settings_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
