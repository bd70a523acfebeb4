"""The config home: every config dataclass of fam, validated at load time.

Typed dataclasses are the single source of truth (STYLE practice 4); YAML files in
``configs/`` mirror them and ``key=value`` overrides go on top (:func:`load_config`).

* :mod:`fam.config.training` — sections every stage shares (optim, LoRA, run);
* :mod:`fam.config.stages` — one config per training stage;
* :mod:`fam.config.scenes` — the Scenes benchmark;
* :mod:`fam.config.experiments` — demo, ablation and projector comparison presets;
* :mod:`fam.config.tools` — the FAM probes and the memory planner;
* :mod:`fam.config.deploy` — the vector index and the HTTP server;
* :mod:`fam.config.checks` — the validation rules and the :class:`Validated` base;
* :mod:`fam.config.loader` — YAML + overrides → a validated config.

A test (``tests/test_architecture.py``) keeps every ``*Config`` dataclass in this package.
"""
from fam.config.checks import Validated, bookkeeping_keys
from fam.config.deploy import (HnswConfig, MultiVectorIndexConfig, SearchWorkerConfig,
                               ServeConfig)
from fam.config.experiments import (CompareConfig, DemoConfig, DemoMediaConfig,
                                    SceneModelConfig, TinyModelConfig)
from fam.config.loader import (apply_overrides, deep_merge, from_dict, load_config, read_yaml,
                               to_dict)
from fam.config.scenes import ScenesConfig, ScenesMediaConfig
from fam.config.stages import (AdaptConfig, AlignConfig, CAbstractorConfig, MultiVectorConfig,
                               ProjectorConfig, SftConfig, Stage0Config, TowerConfig, VeinConfig)
from fam.config.tools import GpuBenchConfig, PlanConfig, ProbeConfig
from fam.config.training import BackboneConfig, LoraConfig, OptimConfig, RunConfig

__all__ = ["Validated", "bookkeeping_keys", "load_config", "from_dict", "to_dict",
           "apply_overrides", "deep_merge", "read_yaml", "OptimConfig", "LoraConfig", "RunConfig",
           "BackboneConfig", "Stage0Config", "AlignConfig",
           "VeinConfig", "AdaptConfig", "ProjectorConfig", "CAbstractorConfig", "TowerConfig",
           "SftConfig", "MultiVectorConfig",
           "ScenesConfig", "ScenesMediaConfig", "TinyModelConfig",
           "SceneModelConfig", "DemoConfig", "DemoMediaConfig", "CompareConfig", "ProbeConfig",
           "PlanConfig",
           "HnswConfig", "ServeConfig", "MultiVectorIndexConfig", "SearchWorkerConfig",
           "GpuBenchConfig"]
