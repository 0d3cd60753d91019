"""``fused_a2a.compat.install``/``uninstall``/``replaced``, the launcher, the stand-ins' signatures and their
patchable module state. In this process: no deep_ep, no uccl, no TransformerEngine; the frameworks'
packages are small fakes written to a temporary folder (or absent)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from unittest import mock

import pytest

import fused_a2a.compat as compat
from compat_workers import (AUTOMODEL, AUTOMODEL_DISPATCHER_NAMES, MEGATRON, MEGATRON_DISPATCHER_NAMES,
                            MEGATRON_HYBRID_DISPATCH, parameters)
from fused_a2a.backends import deepep, hybridep_buffer, uccl
from fused_a2a.compat import automodel, launch, megatron
from fused_a2a.seed import hybridep as seed_hybridep

FRAMEWORK_ROOTS = ("megatron", "nemo_automodel")


@pytest.fixture
def clean():
    """Leave sys.modules, sys.meta_path, the stand-ins and the process-wide buffers as they were."""
    meta_path = list(sys.meta_path)
    yield
    for framework in compat.FRAMEWORKS:
        compat.uninstall(framework)
    for name in [n for n in sys.modules if n.split(".")[0] in FRAMEWORK_ROOTS]:
        del sys.modules[name]
    sys.meta_path[:] = meta_path
    deepep.set_current_buffer(None)
    deepep._nvshmem_available = None
    uccl.set_current_buffer(None)
    seed_hybridep.reset_hybrid_ep_buffer()


def _write_framework(root: Path, module: str, names: tuple[str, ...], own_module: str) -> None:
    """A fake framework: the packages above ``module`` (the top one a namespace package, as
    ``megatron`` is), its own ``module`` (``own_module`` as source) and a dispatcher importing ``names``."""
    parts = module.split(".")
    folder = root.joinpath(*parts[:-1])
    folder.mkdir(parents=True)
    for depth in range(2, len(parts)):
        (root.joinpath(*parts[:depth]) / "__init__.py").write_text("")
    (folder / f"{parts[-1]}.py").write_text(own_module)
    (folder / "token_dispatcher.py").write_text(f"from {module} import {', '.join(names)}\n")


def _fake_megatron(root: Path, own_module: str = "raise AssertionError('the framework module itself was imported')\n"):
    _write_framework(root, MEGATRON, MEGATRON_DISPATCHER_NAMES, own_module)


def _fake_automodel(root: Path, own_module: str = "raise AssertionError('the framework module itself was imported')\n"):
    _write_framework(root, AUTOMODEL, AUTOMODEL_DISPATCHER_NAMES, own_module)


def test_unknown_framework_is_one_value_error(clean) -> None:
    for call in (compat.install, compat.uninstall):
        with pytest.raises(ValueError, match=r"^unknown framework 'nemo'; choose from automodel, megatron$"):
            call("nemo")
    assert compat.replaced() == {}


def test_install_before_the_framework_imports_its_module(clean, tmp_path: Path, monkeypatch) -> None:
    _fake_megatron(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert compat.install("megatron") is None
    assert "megatron" not in sys.modules  # installing imports none of the framework's packages
    assert sys.modules[MEGATRON] is megatron and compat.replaced() == {"megatron": MEGATRON}
    assert compat.install("megatron") is None  # twice: a no-op

    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    assert dispatcher.HYBRIDEP_TOKEN_ALIGNMENT == 64 and dispatcher.nccl_ep_finalize is megatron.nccl_ep_finalize
    import megatron.core.transformer.moe as package
    import megatron.core.transformer.moe.fused_a2a as imported

    assert imported is megatron and package.fused_a2a is megatron  # attached once the parent was imported
    assert type(package.__loader__).__name__ == "SourceFileLoader" and package.__spec__.loader is package.__loader__
    assert not any(type(finder).__name__ == "_AttachOnImport" for finder in sys.meta_path)
    monkeypatch.setattr("megatron.core.transformer.moe.fused_a2a.nccl_ep_finalize", lambda: "patched")
    assert megatron.nccl_ep_finalize() == "patched"
    monkeypatch.undo()

    compat.uninstall("megatron")
    assert MEGATRON not in sys.modules and not hasattr(package, "fused_a2a") and compat.replaced() == {}


def test_install_after_the_parent_package_is_imported(clean, tmp_path: Path, monkeypatch) -> None:
    _fake_automodel(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    package = importlib.import_module("nemo_automodel.components.moe.megatron")
    assert compat.install("automodel") is None
    assert package.fused_a2a is automodel
    from nemo_automodel.components.moe.megatron import fused_a2a  # Automodel's tests import it this way

    assert fused_a2a is automodel
    assert importlib.import_module("nemo_automodel.components.moe.megatron.token_dispatcher").fused_dispatch is None
    compat.uninstall("automodel")
    assert not hasattr(package, "fused_a2a")


def test_install_after_the_framework_imported_its_module_warns_and_returns_it(clean, tmp_path: Path, monkeypatch) -> None:
    _fake_megatron(tmp_path, own_module="ORIGINAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    original = importlib.import_module(MEGATRON)
    with pytest.warns(RuntimeWarning, match="was imported before install"):
        assert compat.install("megatron") is original
    package = sys.modules["megatron.core.transformer.moe"]
    assert sys.modules[MEGATRON] is megatron and package.fused_a2a is megatron
    compat.uninstall("megatron")
    assert sys.modules[MEGATRON] is original and package.fused_a2a is original


def test_install_without_the_framework_installed(clean) -> None:
    if importlib.util.find_spec("nemo_automodel") is not None:
        pytest.skip("NeMo Automodel is installed here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.install("automodel") is None
    namespace: dict = {}
    exec(f"from {AUTOMODEL} import {', '.join(AUTOMODEL_DISPATCHER_NAMES)}, free_buffer", namespace)
    assert namespace["fused_dispatch"] is None and namespace["free_buffer"] is automodel.free_buffer
    assert importlib.import_module(AUTOMODEL) is automodel
    assert importlib.util.find_spec("nemo_automodel") is None  # no fake parent package was made
    with pytest.raises(ModuleNotFoundError, match="nemo_automodel"):
        exec(f"import {AUTOMODEL}", {})
    compat.uninstall("automodel")
    assert AUTOMODEL not in sys.modules
    assert not any(type(finder).__name__ == "_AttachOnImport" for finder in sys.meta_path)


@pytest.mark.parametrize("module", [automodel, megatron], ids=["automodel", "megatron"])
def test_free_buffer_destroys_a_patched_buffer_once_and_swallows_its_error(clean, module) -> None:
    stub = mock.MagicMock()
    stub.destroy.side_effect = RuntimeError("`explicitly_destroy` flag must be set")
    module._buffer = stub
    assert module._buffer is stub and deepep.current_buffer() is stub
    module.free_buffer()
    stub.destroy.assert_called_once_with()
    assert module._buffer is None and deepep.current_buffer() is None
    module.free_buffer()  # nothing left: no second destroy
    stub.destroy.assert_called_once_with()


@pytest.mark.parametrize("module", [automodel, megatron], ids=["automodel", "megatron"])
def test_module_state_is_the_live_buffer_and_patchable(clean, module, monkeypatch) -> None:
    live = object()
    deepep.set_current_buffer(live)
    assert module._buffer is live  # reading shows what the backend holds now
    monkeypatch.setattr(module, "_buffer", "stub")
    assert deepep.current_buffer() == "stub"
    monkeypatch.undo()
    assert deepep.current_buffer() is live
    with mock.patch.object(module, "_buffer", "stub"):
        assert deepep.current_buffer() == "stub"
    assert module._buffer is None  # mock deletes the attribute on exit: no buffer

    caller_made = object()
    module._hybrid_ep_buffer = caller_made
    assert hybridep_buffer.current_buffer() is caller_made and seed_hybridep._made_by_caller
    module._hybrid_ep_buffer = None  # as reset_hybrid_ep_buffer()
    assert hybridep_buffer.current_buffer() is None and not seed_hybridep._made_by_caller


def test_automodel_only_state(clean) -> None:
    automodel._uccl_buffer = "buffer"
    assert uccl.current_buffer() == "buffer" and automodel._uccl_buffer == "buffer"
    automodel._uccl_buffer = None
    assert automodel._nvshmem_available is None
    automodel._nvshmem_available = True  # a cached answer: no deep_ep needed to read it
    assert automodel._is_nvshmem_available() is True and deepep._nvshmem_available is True
    assert not hasattr(megatron, "_uccl_buffer") and not hasattr(megatron, "_nvshmem_available")


EMPTY = inspect.Parameter.empty


def test_every_public_name_is_bound() -> None:
    assert all(hasattr(automodel, name) for name in automodel.__all__)
    assert all(hasattr(megatron, name) for name in megatron.__all__)
    assert set(MEGATRON_DISPATCHER_NAMES) <= set(megatron.__all__)
    assert set(AUTOMODEL_DISPATCHER_NAMES) <= set(automodel.__all__)


def test_signatures_of_the_always_defined_functions() -> None:
    assert parameters(automodel.init_hybrid_ep_buffer) == [
        (name, EMPTY) for name in ("group", "hidden_dim", "seq_len", "num_local_experts", "num_sms_dispatch_api",
                                   "num_sms_combine_api", "fp8_dispatch")]
    assert parameters(megatron.init_hybrid_ep_buffer) == [
        ("group", EMPTY), ("hidden_dim", EMPTY), ("num_tokens", EMPTY), ("num_local_experts", EMPTY),
        ("num_sms_dispatch_api", None), ("num_sms_combine_api", None), ("num_blocks_permute", None),
        ("num_blocks_unpermute", None), ("fp8_dispatch", False), ("num_sms_preprocessing_api", None)]
    assert parameters(megatron.HybridEPDispatch.forward) == [("ctx", EMPTY), *MEGATRON_HYBRID_DISPATCH]
    assert parameters(megatron.ensure_nccl_ep_bootstrapped) == [
        ("ep_group", EMPTY), ("num_experts", EMPTY), ("max_tokens_per_rank", EMPTY), ("recv_capacity_per_rank", EMPTY),
        ("hidden_dim", EMPTY), ("num_topk", EMPTY), ("num_sms", 0), ("zero_copy", False)]
    for module in (automodel, megatron):
        assert parameters(module.get_buffer) == [("group", EMPTY), ("hidden_bytes", EMPTY)]
        assert parameters(module.free_buffer) == [] and parameters(module.reset_hybrid_ep_buffer) == []
    assert parameters(automodel.get_uccl_buffer) == [("group", EMPTY), ("hidden_bytes", EMPTY)]
    assert parameters(automodel._is_nvshmem_available) == []


def _fake_te_ep(with_recipes: bool) -> tuple[types.ModuleType, list]:
    """A recording stand-in for ``transformer_engine.pytorch.ep`` (TransformerEngine's API at d0067d0d)."""
    ep, calls = types.ModuleType("transformer_engine.pytorch.ep"), []
    ep._BOOTSTRAPPED = False

    def ep_bootstrap(ep_group, num_experts, max_tokens_per_rank, hidden_dim, num_topk, recv_capacity_per_rank=None,
                     max_num_sms=0, zero_copy=False, drop_on_overflow=False, max_token_dtype=None):
        calls.append(("bootstrap", ep_group, num_experts, max_tokens_per_rank, hidden_dim, num_topk,
                      recv_capacity_per_rank, max_num_sms, zero_copy, drop_on_overflow))
        ep._BOOTSTRAPPED = True

    def ep_finalize():
        calls.append(("finalize",))
        ep._BOOTSTRAPPED = False

    if with_recipes:
        class EpBuffer:
            def __init__(self, top_k, max_tokens_per_rank, hidden_dim, num_local_experts, recv_capacity_per_rank=None,
                         alignment=0, payload_dtype=None, device=None, dispatch_fwd_quant_recipe=None,
                         combine_bwd_quant_recipe=None):
                self.args = (top_k, max_tokens_per_rank, hidden_dim, num_local_experts, recv_capacity_per_rank,
                             alignment, dispatch_fwd_quant_recipe, combine_bwd_quant_recipe)
    else:
        class EpBuffer:
            def __init__(self, top_k, max_tokens_per_rank, hidden_dim, num_local_experts, recv_capacity_per_rank=None,
                         alignment=0, payload_dtype=None, device=None):
                self.args = (top_k, max_tokens_per_rank, hidden_dim, num_local_experts, recv_capacity_per_rank, alignment)

    ep.ep_bootstrap, ep.ep_finalize, ep.EpBuffer = ep_bootstrap, ep_finalize, EpBuffer
    ep.ep_dispatch = lambda buffer, tokens, idx, weights, *, recv_tokens=None, recv_topk_weights=None: (
        ("recv", buffer, tokens, idx, weights, recv_tokens, recv_topk_weights), "probs", "tokens_per_expert")
    ep.ep_combine = lambda buffer, out, *, num_local_tokens=None, grad_out=None: ("combined", buffer, out,
                                                                                num_local_tokens, grad_out)
    ep.symm_mem_alloc = lambda shape, dtype, group: ("symm", shape, dtype, group)
    return ep, calls


def _megatron_with(ep: types.ModuleType, monkeypatch) -> types.ModuleType:
    """A fresh copy of the Megatron stand-in, imported where ``transformer_engine.pytorch.ep`` is ``ep``."""
    for name, module in (("transformer_engine", types.ModuleType("transformer_engine")),
                         ("transformer_engine.pytorch", types.ModuleType("transformer_engine.pytorch")),
                         ("transformer_engine.pytorch.ep", ep)):
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("compat_megatron_with_te", megatron.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_nccl_ep_functions_call_transformer_engine_as_megatron_does(monkeypatch) -> None:
    ep, calls = _fake_te_ep(with_recipes=True)
    module = _megatron_with(ep, monkeypatch)
    assert module.HAVE_TE_EP is True and module.te_ep is ep and module._TE_EP_BUFFER_HAS_QUANT_RECIPE is True
    assert module.is_nccl_ep_bootstrapped() is False
    module.ensure_nccl_ep_bootstrapped("group", 64, 128, None, 32, 8, num_sms=16)
    module.ensure_nccl_ep_bootstrapped("group", 64, 128, None, 32, 8, num_sms=16)  # idempotent
    assert calls == [("bootstrap", "group", 64, 128, 32, 8, None, 16, False, False)]
    assert module.is_nccl_ep_bootstrapped() is True
    module.nccl_ep_finalize()
    module.ensure_nccl_ep_bootstrapped("group", 64, 128, 256, 32, 8, zero_copy=True)  # capacity: drop on overflow
    assert calls[1:] == [("finalize",), ("bootstrap", "group", 64, 128, 32, 8, 256, 0, True, True)]
    ep.is_ep_bootstrapped = lambda: False  # newer TE: asked, not read
    assert module.is_nccl_ep_bootstrapped() is False

    assert module.alloc_ep_symm_buffer((4, 32), "bf16", "group") == ("symm", (4, 32), "bf16", "group")
    plain = module.new_nccl_ep_buffer(top_k=8, max_tokens_per_rank=128, recv_capacity_per_rank=256, hidden_dim=32,
                                      num_local_experts=4, alignment=16)
    assert plain.args == (8, 128, 32, 4, 256, 16, None, None)
    quantised = module.new_nccl_ep_buffer(8, 128, 256, 32, 4, dispatch_fwd_quant_recipe="mxfp8")
    assert quantised.args[-2:] == ("mxfp8", None)
    recv, tokens_per_expert, probs = module.nccl_ep_dispatch(plain, "x", "idx", "w", recv_tokens="r")
    assert recv == ("recv", plain, "x", "idx", "w", "r", None) and (tokens_per_expert, probs) == ("tokens_per_expert", "probs")
    assert module.nccl_ep_combine(plain, "y", num_local_tokens=7) == ("combined", plain, "y", 7, None)


def test_quantised_nccl_ep_needs_a_transformer_engine_that_takes_recipes(monkeypatch) -> None:
    ep, _ = _fake_te_ep(with_recipes=False)
    module = _megatron_with(ep, monkeypatch)
    assert module._TE_EP_BUFFER_HAS_QUANT_RECIPE is False
    assert module.new_nccl_ep_buffer(8, 128, None, 32, 4).args == (8, 128, 32, 4, None, 0)
    with pytest.raises(RuntimeError, match="quant"):
        module.new_nccl_ep_buffer(8, 128, None, 32, 4, combine_bwd_quant_recipe="mxfp8")


def test_launcher_runs_a_script_as_python_would(clean, tmp_path: Path) -> None:
    script = tmp_path / "scripts" / "train.py"
    script.parent.mkdir()
    script.write_text(
        "import json, sys\n"
        "from megatron.core.transformer.moe.fused_a2a import HYBRIDEP_TOKEN_ALIGNMENT\n"
        "from nemo_automodel.components.moe.megatron.fused_a2a import fused_dispatch\n"
        "import fused_a2a.compat\n"
        "print(json.dumps({'name': __name__, 'argv': sys.argv, 'path0': sys.path[0], 'align': HYBRIDEP_TOKEN_ALIGNMENT,\n"
        "                  'replaced': fused_a2a.compat.replaced()}))\n"
    )
    done = subprocess.run([sys.executable, "-m", "fused_a2a.compat", "megatron,automodel", "--", str(script), "--lr", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"name": "__main__", "argv": [str(script), "--lr", "1"], "path0": str(script.parent), "align": 64,
                    "replaced": {"automodel": AUTOMODEL, "megatron": MEGATRON}}


def test_launcher_runs_a_module_as_python_m_would(clean, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "seen.json"
    (tmp_path / "compat_launch_target.py").write_text(
        "import json, sys\n"
        "from nemo_automodel.components.moe.megatron.fused_a2a import free_buffer\n"
        "if __name__ == '__main__':\n"
        "    json.dump({'argv': sys.argv[1:], 'file': sys.argv[0]}, open(sys.argv[1], 'w'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    launch.main(["automodel", "-m", "compat_launch_target", str(out), "x"])
    seen = json.loads(out.read_text())
    assert seen == {"argv": [str(out), "x"], "file": str(tmp_path / "compat_launch_target.py")}
    assert compat.replaced() == {"automodel": AUTOMODEL}


@pytest.mark.parametrize("argv, problem", [
    ([], "name the framework(s) and the script to run"),
    (["nemo", "train.py"], "unknown framework 'nemo'; choose from automodel, megatron"),
    (["megatron"], "no script to run"),
    (["megatron", "--"], "no script to run"),
    (["megatron", "-m"], "-m needs a module name"),
    (["megatron", "--", "no_such_train.py"], "no such script: no_such_train.py"),
])
def test_launcher_usage_errors_exit_2_with_one_line(clean, capsys, argv, problem) -> None:
    with pytest.raises(SystemExit) as exit_:
        launch.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"fused_a2a.compat: {problem}"
    assert compat.replaced() == {}  # nothing installed on a usage error
