"""The layers hold: the import-linter contracts pass, the engine's commands never load Prefect,
and nothing is importable under the bare names ``flows`` or ``blocks``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and proc.stdout.count("KEPT") >= 3


def test_engine_commands_load_no_prefect(tmp_path: Path) -> None:
    manifest = REPO / "examples" / "device-visits" / "manifest.json"
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from algodock.cli import main\n"
        f"result = CliRunner().invoke(main, ['validate', {str(manifest)!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "CliRunner().invoke(main, ['run-step', '--help'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'prefect_docker', 'prefect_aws', 'prefect_dask'))\n"
        "assert not loaded, loaded[:5]\n"
        "assert 'algodock.flows' not in sys.modules and 'algodock.blocks' not in sys.modules\n"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_bare_flows_or_blocks_package(tmp_path: Path) -> None:
    proc = _python("import importlib.util as u; print(u.find_spec('flows'), u.find_spec('blocks'))", tmp_path)
    assert proc.returncode == 0 and proc.stdout.split() == ["None", "None"], proc.stdout + proc.stderr
    proc = _python("import algodock.flows.pipeline, algodock.blocks; print('ok')", tmp_path)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_prefect_entry_points_name_the_packaged_objects() -> None:
    code = (
        "import runpy\n"
        "from algodock.flows.pipeline import run_pipeline\n"
        "from algodock.blocks import AlgorithmBlock\n"
        "ns = runpy.run_path('flows/algodock_flows.py')\n"
        "assert ns['run_pipeline'] is run_pipeline\n"
        "ns = runpy.run_path('blocks/algodock_blocks.py')\n"
        "assert ns['AlgorithmBlock'] is AlgorithmBlock\n"
    )
    proc = _python(code, REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "flows/algodock_flows.py:run_pipeline" in (REPO / "prefect.yaml").read_text()
