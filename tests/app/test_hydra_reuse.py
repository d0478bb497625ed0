"""The registered configs (bn_lightning.hydra) serve another Hydra application exactly as docs/hydra.md shows."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from bn_lightning.app import schemas
from bn_lightning.hydra import BN_OPTIONS, CALLBACK_OPTIONS
from bn_lightning.policy import BatchNormPolicy, FreezePolicy, PreciseBNPolicy

HYDRA_DOC = Path(__file__).resolve().parents[2] / "docs" / "hydra.md"


def docs_example() -> str:
    """The python block of docs/hydra.md's "In another application" section."""
    section = HYDRA_DOC.read_text().split("## In another application", 1)[1]
    return re.search(r"^```python\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)


def test_docs_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example writes its own primary config, composes it and asserts what it builds."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(docs_example(), "docs/hydra.md (In another application)", "exec"), namespace)
    assert (tmp_path / "conf" / "config.yaml").read_text().startswith("defaults:\n  - _self_\n")
    assert type(namespace["monitor"]).__name__ == "BatchNormMonitor" and namespace["monitor"].bins == 32
    assert namespace["policy"] == BatchNormPolicy(impl="ghost")


def test_groups_and_options_are_registered() -> None:
    store = ConfigStore.instance()
    assert sorted(store.list("bn_lightning/bn")) == sorted(f"{o}.yaml" for o in BN_OPTIONS)
    assert set(BN_OPTIONS) == {"torch", "scratch", "sync", "ghost", "renorm", "frozen"}
    assert sorted(store.list("bn_lightning/callbacks")) == sorted(f"{o}.yaml" for o in CALLBACK_OPTIONS)
    assert set(CALLBACK_OPTIONS) == {
        "monitor",
        "drift",
        "precise_bn",
        "gap",
        "freeze",
        "guard",
        "accumulate",
        "sync_buffers",
    }


@pytest.mark.parametrize("schema", list(schemas.TARGETS), ids=lambda s: s.__name__)
def test_schema_matches_the_constructor(schema: type) -> None:
    """Each schema has exactly the constructor's arguments with its defaults, so the two cannot drift apart."""
    cls = get_class(schemas.TARGETS[schema])
    fields = {f.name: f for f in dataclasses.fields(schema) if f.name != "_target_"}
    if cls is BatchNormPolicy:  # a dataclass: its fields are its arguments; the nested nodes are checked below
        expected = {f.name: f for f in dataclasses.fields(cls)}
        assert list(fields) == list(expected)
        for name in ("impl", "include", "exclude", "momentum", "eps", "no_weight_decay"):
            assert fields[name].default == expected[name].default, name
        return
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    assert list(fields) == list(params)
    for name, param in params.items():
        assert fields[name].default == param.default, name


@pytest.mark.parametrize(
    ("schema", "policy"),
    [(schemas.FreezePolicyConfig, FreezePolicy), (schemas.PreciseBNPolicyConfig, PreciseBNPolicy)],
)
def test_nested_policy_schema_matches_the_policy(schema: type, policy: type) -> None:
    fields = {f.name: f.default for f in dataclasses.fields(schema)}
    assert fields.pop("enabled") is None
    assert fields == {f.name: f.default for f in dataclasses.fields(policy)}


def foreign_app(tmp_path: Path, overrides: tuple[str, ...] = ()):
    (tmp_path / "config.yaml").write_text(
        "defaults:\n  - _self_\n  - bn_lightning/callbacks@callbacks.bn_monitor: monitor\n"
        + "".join(f"  - bn_lightning/callbacks@callbacks.{o}: {o}\n" for o in CALLBACK_OPTIONS if o != "monitor")
        + "  - bn_lightning/bn@bn: renorm\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_registered_callback_instantiates(tmp_path: Path) -> None:
    cfg = foreign_app(tmp_path, ("callbacks.drift.max_drift_kl=1.5",))
    built = {name: instantiate(node) for name, node in cfg.callbacks.items()}
    assert {name: type(obj).__name__ for name, obj in built.items()} == {
        "bn_monitor": "BatchNormMonitor",
        "drift": "RunningStatDrift",
        "precise_bn": "PreciseBN",
        "gap": "BatchNormGap",
        "freeze": "BatchNormFreeze",
        "guard": "BatchNormGuard",
        "accumulate": "AccumulateBatchNormStats",
        "sync_buffers": "SyncBatchNormBuffers",
    }
    assert built["drift"].max_drift_kl == 1.5
    assert instantiate(cfg.bn) == BatchNormPolicy(impl="renorm")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("callbacks.bn_monitor.binz=3", "binz"),  # misspelt key
        ("callbacks.bn_monitor.bins=many", "callbacks.bn_monitor.bins"),  # wrong type
        ("bn.momentun=0.1", "momentun"),
        ("bn.momentum=[0.1]", "bn.momentum"),
    ],
)
def test_bad_key_or_type_fails_at_composition(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        foreign_app(tmp_path, (override,))
    assert key in str(err.value) + str(err.value.__cause__)


def test_plugin_schema_instantiates() -> None:
    plugin = instantiate(OmegaConf.structured(schemas.SyncBatchNormPluginConfig(group_size=2)))
    assert type(plugin).__name__ == "SyncBatchNormPlugin" and plugin.group_size == 2


def test_nested_policy_enabled() -> None:
    node = OmegaConf.structured(schemas.BatchNormPolicyConfig)
    assert BatchNormPolicy.from_config(node).precise_bn is None  # the untouched node is off
    node.precise_bn.num_batches = 5  # setting a field turns it on
    assert BatchNormPolicy.from_config(node).precise_bn == PreciseBNPolicy(num_batches=5)
    node.freeze.enabled = True  # all defaults: freeze from the start
    assert BatchNormPolicy.from_config(node).freeze == FreezePolicy()
    node.precise_bn.enabled = False
    assert BatchNormPolicy.from_config(node).precise_bn is None
    node.freeze = None
    assert BatchNormPolicy.from_config(node).freeze is None
    with pytest.raises(TypeError, match="enabled must be True, False or None"):
        BatchNormPolicy(precise_bn={"enabled": "yes"})
    with pytest.raises(ValueError, match="_target_ must be 'bn_lightning.policy.BatchNormPolicy'"):
        BatchNormPolicy.from_config({"_target_": "torch.nn.BatchNorm2d"})
