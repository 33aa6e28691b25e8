"""`scripts/mutation_check.py` plants each fault by replacing one exact piece of source: when the
code moves, a fault no longer finds its piece and the check reports it as not planted, which only a
full run (not CI) shows. This keeps the faults in step with the code."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _faults():
    spec = importlib.util.spec_from_file_location("mutation_check",
                                                  ROOT / "scripts" / "mutation_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.FAULTS


@pytest.mark.parametrize("fault", _faults(), ids=lambda f: f.name)
def test_every_fault_finds_its_source_exactly_once(fault):
    assert (ROOT / fault.path).read_text().count(fault.old) == 1
    for test in fault.tests:
        if test.startswith("tests/"):
            assert (ROOT / test.split("::")[0]).is_file(), test
