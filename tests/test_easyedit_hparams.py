"""EasyEdit hyperparameter YAML files (WISE, GRACE, ROME, MEMIT, AlphaEdit) translated into editbank's."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from editbank.cli import app
from editbank.methods.base import build_hparams, get_method
from editbank.methods.easyedit import RUN_SETTING, translate

MODULES = ('rewrite_module_tmp: "model.layers.{}.mlp.down_proj"\nlayer_module_tmp: "model.layers.{}"\n'
           'mlp_module_tmp: "model.layers.{}.mlp"\nattn_module_tmp: "model.layers.{}.self_attn"\n'
           'ln_f_module: "model.norm"\nlm_head_module: "lm_head"\n')

# keys as in EasyEdit's published hparams/<ALG>/llama-7b.yaml files (values small; `5e-1` is read as a string)
YAMLS = {
    "wise": ('alg_name: "WISE"\nmodel_name: "./hugging_cache/llama-2-7b"\ndevice: 0\nmask_ratio: 0.2\nedit_lr: 1.0\n'
             'n_iter: 5\nnorm_constraint: 1.0\nact_margin: [5.0, 20.0, 10.0]\nact_ratio: 0.88\nsave_freq: 5\n'
             'merge_freq: 10\nmerge_alg: "ties"\nobjective_optimization: "only_label"\n'
             'inner_params:\n- model.layers[1].mlp.down_proj.weight\nweights: 1.0\ndensities: 0.53\n'
             'retrieve: True\nreplay: False\nbatch_size: 1\nmax_length: 30\nmodel_parallel: false\n'),
    "grace": ('alg_name: "GRACE"\nmodel_name: "./hugging_cache/llama2-7b-chat"\ndevice: 0\n'
              'inner_params:\n- model.layers[1].mlp.down_proj.weight\nedit_lr: 1.0\nn_iter: 10\neps: 1e-1\n'
              'dist_fn: euc\nval_init: cold\nval_train: sgd\nval_reg: None\nreg: early_stop\n'
              'replacement: replace_prompt\neps_expand: coverage\nnum_pert: 8\ndropout: 0.0\n'),
    "rome": ('alg_name: "ROME"\nmodel_name: "./hugging_cache/llama-2-7b"\nstats_dir: "./data/stats"\ndevice: 0\n'
             'layers: [1]\nfact_token: "subject_last"\nv_num_grad_steps: 5\nv_lr: 5e-1\nv_loss_layer: 3\n'
             'v_weight_decay: 1e-3\nclamp_norm_factor: 4\nkl_factor: 0.0625\nmom2_adjustment: true\n'
             'context_template_length_params: [[5, 10], [10, 10]]\n' + MODULES +
             'mom2_dataset: "wikipedia"\nmom2_n_samples: 1e3\nmom2_dtype: "float32"\n'),
    "memit": ('alg_name: "MEMIT"\nmodel_name: "./hugging_cache/llama-2-7b"\nstats_dir: "./data/stats"\ndevice: 0\n'
              'layers: [0, 1]\nclamp_norm_factor: 4\nlayer_selection: "all"\nfact_token: "subject_last"\n'
              'v_num_grad_steps: 5\nv_lr: 5e-1\nv_loss_layer: 3\nv_weight_decay: 1e-3\nkl_factor: 0.0625\n'
              'mom2_adjustment: true\nmom2_update_weight: 15000\n' + MODULES +
              'mom2_dataset: "wikipedia"\nmom2_n_samples: 1000\nmom2_dtype: "float32"\n'),
    "alphaedit": ('alg_name: "AlphaEdit"\nmodel_name: "./hugging_cache/llama-3-8b"\nstats_dir: "./data/stats"\n'
                  'P_loc: "./null_space_project.pt"\ndevice: 0\nlayers: [0, 1]\nclamp_norm_factor: 0.75\n'
                  'layer_selection: "all"\nfact_token: "subject_last"\nv_num_grad_steps: 5\nv_lr: 1e-1\n'
                  'v_loss_layer: 3\nv_weight_decay: 0.5\nkl_factor: 0.0625\nmom2_adjustment: true\n'
                  'mom2_update_weight: 15000\n' + MODULES +
                  'mom2_dataset: "wikipedia"\nmom2_n_samples: 1000\nmom2_dtype: "float32"\n'
                  'nullspace_threshold: 2e-2\nL2: 10\n'),
}

# a ported decay or clamp takes the reference's forms with it (target_norms), so the values mean the same
LOCATE = {"fact_token": "subject_last", "v_num_grad_steps": 5, "v_lr": 0.5, "v_weight_decay": 1e-3,
          "clamp_norm_factor": 4, "kl_factor": 0.0625, "target_norms": "reference"}
EXPECTED = {
    "wise": {"layer": 1, "mask_ratio": 0.2, "edit_lr": 1.0, "n_iter": 5, "norm_constraint": 1.0,
             "act_margin": [5.0, 20.0, 10.0], "act_ratio": 0.88, "save_freq": 5, "merge_freq": 10,
             "merge_alg": "ties", "densities": 0.53, "retrieve": True},
    "grace": {"layer": 1, "edit_lr": 1.0, "n_iter": 10, "eps_init": 0.1},
    "rome": {**LOCATE, "layers": [1], "mom2_n_samples": 1000, "mom2_adjustment": True},
    "memit": {**LOCATE, "layers": [0, 1], "mom2_update_weight": 15000, "mom2_n_samples": 1000},
    "alphaedit": {**LOCATE, "layers": [0, 1], "clamp_norm_factor": 0.75, "v_lr": 0.1, "v_weight_decay": 0.5,
                  "mom2_n_samples": 1000, "nullspace_threshold": 0.02, "nullspace_relative": False, "L2": 10},
}
# dropped with a reason of their own (not a run setting)
NOTED = {
    "wise": {"objective_optimization", "weights"},
    "grace": {"val_init", "replacement", "reg", "val_reg", "num_pert"},
    "rome": {"v_loss_layer", "context_template_length_params", "mom2_dataset"},
    "memit": {"v_loss_layer", "mom2_dataset", "mom2_adjustment"},
    "alphaedit": {"v_loss_layer", "mom2_dataset", "mom2_adjustment", "mom2_update_weight", "P_loc"},
}


@pytest.mark.parametrize("method", sorted(YAMLS))
def test_easyedit_yaml_translates(method, tmp_path):
    path = tmp_path / f"{method}.yaml"
    path.write_text(YAMLS[method])
    hp, dropped = translate(method, yaml.safe_load(path.read_text()))
    assert hp == EXPECTED[method]
    assert type(hp.get("mom2_n_samples", 0)) is int  # 1e3 -> 1000
    assert {"alg_name", "model_name", "device"} <= {k for k, why in dropped.items() if why == RUN_SETTING}
    assert {k for k, why in dropped.items() if why != RUN_SETTING} == NOTED[method]
    built = build_hparams(get_method(method).Hparams, hp)
    for k, v in hp.items():
        assert getattr(built, k) == v


@pytest.mark.parametrize("method", sorted(YAMLS))
def test_unknown_key_is_named(method):
    with pytest.raises(ValueError, match=rf"unknown {method.upper()} hyperparameter 'edit_lrr'.*known: \[") as err:
        translate(method, {"edit_lrr": 1.0})
    assert "'alg_name'" in str(err.value)


@pytest.mark.parametrize("method, key, value", [
    ("rome", "fact_token", "subject_first"),
    ("memit", "fact_token", "subject_subseq"),
    ("alphaedit", "layer_selection", "random"),
    ("grace", "dist_fn", "mmd"),
    ("grace", "eps_expand", "moving_average"),
    ("grace", "val_train", "adv"),
    ("grace", "dropout", 0.1),
    ("grace", "inner_params", ["model.layers[1].self_attn.o_proj.weight"]),
    ("wise", "inner_params", ["model.layers[1].mlp.down_proj.weight", "model.layers[2].mlp.down_proj.weight"]),
])
def test_unsupported_value_is_named(method, key, value):
    with pytest.raises(ValueError, match=rf"EasyEdit {key}: .*not supported") as err:
        translate(method, {key: value})
    assert repr(value) in str(err.value)


def test_own_names_alg_name_and_other_methods():
    # editbank's own names are accepted too and win over what an EasyEdit key implied
    hp, _ = translate("alphaedit", {"nullspace_threshold": 1e-2, "nullspace_relative": True, "max_undo_log": 4})
    assert hp == {"nullspace_threshold": 1e-2, "nullspace_relative": True, "max_undo_log": 4}
    hp, _ = translate("grace", {"value_mode": "shared", "eps": 2})
    assert hp == {"value_mode": "shared", "eps_init": 2}
    # a path as mom2_dataset is kept (a text file of the corpus)
    assert translate("memit", {"mom2_dataset": "texts.txt"})[0] == {"mom2_dataset": "texts.txt"}
    # REPAIR reads WISE files, MetaKE AlphaEdit files; a mismatched alg_name is an error
    assert translate("repair", {"alg_name": "WISE", "n_iter": 3})[0] == {"n_iter": 3}
    assert translate("metake", {"alg_name": "AlphaEdit", "L2": 2})[0] == {"L2": 2}
    with pytest.raises(ValueError, match="alg_name 'ROME' does not match method 'memit'"):
        translate("memit", {"alg_name": "ROME"})
    # a method without a translation takes the keys as its own names
    assert translate("sola", {"anything": 1}) == ({"anything": 1}, {})


def test_cli_edit_with_an_easyedit_rome_yaml(small_world, world_requests, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBANK_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "rome.yaml"
    cfg.write_text(YAMLS["rome"].replace("mom2_n_samples: 1e3", "mom2_n_samples: 200"))
    db, req = str(tmp_path / "e.db"), world_requests[0]
    res = CliRunner().invoke(app, ["edit", "--model", str(small_world.path), "--store", db, "--method", "rome",
                                   "--hparams", str(cfg), "--hp", "fact_token=last", "--prompt", req.prompt,
                                   "--target", req.target, "--subject", req.subject, "--no-check", "--json"])
    assert res.exit_code == 0, res.output
    assert "ignoring" in res.stderr and "mom2_dataset" in res.stderr and "alg_name" in res.stderr
    meta = json.loads(CliRunner().invoke(app, ["ls", "--store", db, "--json"]).stdout)["meta"]
    hp = meta["hparams"]
    assert meta["method"] == "rome" and hp["layers"] == [1] and hp["v_lr"] == 0.5 and hp["fact_token"] == "last"
    assert hp["mom2_n_samples"] == 200 and any((tmp_path / "cache").rglob("*"))


def test_rome_mom2_adjustment_false_is_honoured():
    hp, _ = translate("rome", {"mom2_adjustment": False, "layers": [1]})
    assert hp == {"mom2_adjustment": False, "layers": [1]}
    assert build_hparams(get_method("rome").Hparams, hp).mom2_adjustment is False
