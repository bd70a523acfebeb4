"""The export's model card: where it finds the training record and the results."""
from __future__ import annotations

import json

import pytest

from fam.errors import ConfigError
from fam.export.card import find_results


def test_results_of_a_demo_run_are_found(tmp_path):
    model = tmp_path / "demo" / "fam" / "model"
    model.mkdir(parents=True)
    res = {"overall": 43.6}
    (tmp_path / "demo" / "results.json").write_text(json.dumps(
        {"models": {"vlm2vec": {"overall": 34.6}, "fam": res},
         "paths": {"vlm2vec": "runs/x/demo/baseline/model", "fam": "runs/x/demo/fam/model"}}))
    assert find_results(model, None)[0] is None  # recorded path names another folder
    (tmp_path / "demo" / "results.json").write_text(json.dumps(
        {"models": {"vlm2vec": {"overall": 34.6}, "fam": res},
         "paths": {"vlm2vec": "demo/baseline/model", "fam": "demo/fam/model"}}))
    found, src = find_results(model, None)
    assert found == res and src.endswith("results.json (fam)")
    assert find_results(model, tmp_path / "demo" / "results.json")[0] == res
    with pytest.raises(ConfigError, match="has no results for"):
        find_results(tmp_path / "demo" / "other", tmp_path / "demo" / "results.json")
