"""A run killed after its first part resumes where it stopped and ends with the same files."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from extraction.extract import extract
from tests.extraction.conftest import assert_same_parts, extract_cfg

REPO = Path(__file__).resolve().parents[2]

# The child runs `luna extract` and SIGKILLs itself when the second part is about to be written,
# leaving a half-written temporary file behind as a real crash would.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import extraction.pairs as pairs

    real, calls = pairs.write_part, []

    def write_then_die(path, part, dtype="float16"):
        calls.append(path)
        if len(calls) == 2:
            Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}").write_bytes(b"half a part")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, part, dtype=dtype)

    pairs.write_part = write_then_die
    from extraction.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_resume_after_kill_gives_the_uninterrupted_result(extracted, shards_dir, tiny_checkpoints, tmp_path):
    reference, full = extracted
    out = tmp_path / "pairs"
    args = [f"shards={shards_dir}", f"out={out}", f"checkpoints.dirs=[{tiny_checkpoints[0]['dir']}]",
            "progress=false", "batch_size=3", "dtype=float32", "workers=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    assert [p.name for p in out.glob("*.h5")] == ["pairs-faces-pc1-w0-000000.h5"]

    resumed = extract(extract_cfg(shards_dir, out, tiny_checkpoints, "dtype=float32", "workers=2"))
    assert resumed.skipped_done == ["faces-pc1-w0-000000.tar"] and len(resumed.written) == 2
    # prompts of the first part were not encoded again
    assert resumed.text["prompts_encoded"] < full.text["prompts_encoded"]
    assert resumed.unique_prompts == full.unique_prompts
    assert_same_parts(reference, out)
