"""Luna Foundry's ground floor: the `luna` command, settings, files, models and the Ray cluster connection,
shared by every stage (it imports none of them)."""
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def _data_dir(name: str) -> Path:
    """A checkout (or editable install) keeps `name`/ at the top; an installed wheel carries it as luna/`name`/."""
    packaged = PACKAGE_DIR / name
    return packaged if packaged.is_dir() else REPO_ROOT / name


CONF_DIR = _data_dir("conf")  # Hydra configs, one primary config per subcommand
CAMPAIGNS_DIR = _data_dir("campaigns")  # campaign files (data, not Hydra config): `campaign=NAME`
