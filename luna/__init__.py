"""Luna Foundry: shared pieces (command line, model loading, Ray cluster) used by every stage."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
