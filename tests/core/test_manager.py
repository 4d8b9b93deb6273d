"""The plugin manager: discovery with provenance, conflicts, disabling, broken plugins."""

import importlib
import sys

import pytest

from distill import LossSpec, hookimpl
from distill.errors import ComponentConflictError, PluginError, PluginLoadError, UnknownComponentError
from distill.manager import PluginManager


def _loss_plugin(name):
    class Plugin:
        @hookimpl
        def distill_losses(self):
            return [LossSpec(name=name, summary="test", teacher_signal="logprobs", factory=lambda o, c: None)]

    return Plugin()


def test_builtins_are_entry_points_with_provenance():
    manager = PluginManager()
    infos = {info.name: info for info in manager.plugins()}
    assert {"hf", "losses", "routing", "checkpoint_local", "metrics"} <= set(infos)
    assert infos["losses"].distribution == "distill"
    assert ("loss", "sampled_reverse_kl") in infos["losses"].components
    assert manager.provider("teacher", "hf").name == "hf"


def test_two_plugins_registering_the_same_name_is_an_error_naming_both():
    manager = PluginManager(load_entry_points=False)
    manager.register(_loss_plugin("mine"), name="first")
    manager.register(_loss_plugin("Mine"), name="second")  # names normalise: same component
    with pytest.raises(ComponentConflictError) as err:
        manager.components("loss")
    assert str(err.value) == (
        "loss 'mine' is registered twice: by plugin 'first' (registered in-process) and by plugin "
        "'second' (registered in-process). Uninstall or disable one of them (--disable-plugin NAME)."
    )
    manager.unregister("second")
    assert list(manager.components("loss")) == ["mine"]


def test_disabled_plugin_is_not_loaded_and_named_in_lookups(monkeypatch):
    monkeypatch.setenv("DISTILL_DISABLE_PLUGINS", "losses, metrics")
    from distill.manager import disabled_from_env

    manager = PluginManager(disabled=disabled_from_env())
    assert "losses" not in {info.name for info in manager.plugins()}
    with pytest.raises(UnknownComponentError) as err:
        manager.get("loss", "sampled_reverse_kl")
    assert str(err.value) == "Unknown loss 'sampled_reverse_kl'. Available: none. Disabled plugins: losses, metrics."


def test_unknown_component_lists_what_is_available():
    with pytest.raises(UnknownComponentError, match=r"^Unknown loss 'fkl'\. Available: full_forward_kl, full_reverse_kl, generalized_jsd, sampled_reverse_kl, topk_forward_kl\.$"):
        PluginManager().get("loss", "fkl")


def test_hook_returning_the_wrong_type_names_the_plugin():
    class Bad:
        @hookimpl
        def distill_losses(self):
            return ["not a spec"]

    manager = PluginManager(load_entry_points=False)
    manager.register(Bad(), name="bad")
    with pytest.raises(PluginError, match=r"plugin 'bad' \(registered in-process\): distill_losses\(\) returned 'not a spec'"):
        manager.components("loss")


class Typo:
    @hookimpl
    def distill_lossess(self):
        return []

    @hookimpl
    def distill_frobnicate(self):
        return []


def test_unknown_hook_name_is_rejected_at_registration_with_the_close_match():
    manager = PluginManager(load_entry_points=False)
    with pytest.raises(PluginLoadError) as err:
        manager.register(Typo(), name="typo")
    assert str(err.value) == (
        f"plugin 'typo' (registered in-process): {__name__}.Typo implements unknown hook 'distill_frobnicate' "
        "(hooks: distill_blenders, distill_checkpoint_backends, distill_losses, distill_metric_sinks, "
        "distill_on_checkpoint_saved, distill_on_step_end, distill_routers, distill_samplers, "
        "distill_select_loss_kernel, distill_teachers, distill_trainers), unknown hook 'distill_lossess' (did you mean 'distill_losses'?)."
    )
    assert "typo" not in {info.name for info in manager.plugins()}


def test_a_plugin_module_without_hook_implementations_is_registered_with_a_warning_naming_it(tmp_path, monkeypatch):
    (tmp_path / "distill_forgetful.py").write_text(
        "from distill import LossSpec\n\n"
        "def distill_losses():  # @hookimpl forgotten\n"
        "    return [LossSpec(name='forgotten', summary='x', teacher_signal='logprobs', factory=None)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    forgetful = importlib.import_module("distill_forgetful")
    manager = PluginManager(load_entry_points=False)
    with pytest.warns(UserWarning) as caught:
        manager.register(forgetful, name="forgetful")
    assert [str(w.message) for w in caught] == [(
        "plugin 'forgetful' (registered in-process): module distill_forgetful implements no distill hook "
        "(no @hookimpl on distill_losses), so it provides nothing. Mark its hook functions with @distill.hookimpl."
    )]
    assert caught[0].filename == __file__  # points at the register call
    sys.modules.pop("distill_forgetful")


@pytest.fixture
def broken_distribution(tmp_path, monkeypatch):
    """A real installed distribution (dist-info on sys.path) whose entry point fails to import."""
    (tmp_path / "distill_broken.py").write_text("raise RuntimeError('boom at import')\n")
    info = tmp_path / "distill_broken-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: distill-broken\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[distill.plugins]\nbroken = distill_broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("distill_broken", None)


def test_broken_plugin_is_reported_with_its_distribution(broken_distribution):
    with pytest.raises(PluginLoadError) as err:
        PluginManager()
    assert str(err.value) == (
        "plugin 'broken' (distribution distill-broken 0.3) failed to import (distill_broken): "
        "RuntimeError: boom at import. Fix or uninstall distill-broken, or disable it with "
        "--disable-plugin broken or DISTILL_DISABLE_PLUGINS=broken."
    )
    assert "broken" not in {info.name for info in PluginManager(disabled={"broken"}).plugins()}


def test_cli_plugins_lists_provenance_and_honours_disable(capsys):
    from distill.cli import main

    assert main(["--disable-plugin", "metrics", "plugins"]) == 0
    out = capsys.readouterr().out
    assert "losses  (distill 0.1.0)" in out
    assert "sampled_reverse_kl" in out
    assert "metrics  (" not in out
    assert "disabled: metrics" in out


def test_kernel_dispatch_reference_is_the_fallback_and_can_be_forced():
    from distill.plugins import losses

    manager = PluginManager(load_entry_points=False)
    manager.register(losses, name="losses")
    assert manager.select_loss_kernel(loss="sampled_reverse_kl", kernel="auto", device="cpu", dtype="float32").name == "reference"

    class Claims:
        name = "claiming"

        @hookimpl
        def distill_select_loss_kernel(self, loss, kernel, device, dtype):
            return self if kernel in ("auto", "claiming") else None

    manager.register(Claims(), name="claims")
    assert manager.select_loss_kernel(loss="x", kernel="auto", device="cpu", dtype="float32").name == "claiming"
    assert manager.select_loss_kernel(loss="x", kernel="reference", device="cpu", dtype="float32").name == "reference"
    with pytest.raises(UnknownComponentError, match="No installed plugin provides loss kernel 'triton'"):
        manager.select_loss_kernel(loss="x", kernel="triton", device="cpu", dtype="float32")


def test_observers_receive_keyword_arguments():
    seen = []

    class Observer:
        @hookimpl
        def distill_on_step_end(self, step, metrics):  # may name only the arguments it needs
            seen.append((step, dict(metrics)))

    manager = PluginManager(load_entry_points=False)
    manager.register(Observer(), name="observer")
    manager.on_step_end(run=None, step=3, metrics={"loss": 1.0})
    assert seen == [(3, {"loss": 1.0})]


def test_the_old_name_of_the_kernels_plugin_still_disables_it_with_a_warning():
    with pytest.warns(FutureWarning, match="plugin 'cuda_losses' is now called 'fused_losses'"):
        manager = PluginManager(disabled={"cuda_losses"})
    assert manager.disabled == {"fused_losses"}
    assert "fused_losses" not in {info.name for info in manager.plugins()}
