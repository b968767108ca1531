"""The model registry: every arch builds from its config and meets the contract; checkpoints come back
identical and refuse to load as another arch or stage; parameter sets and arch recipes; `diffret params`."""
import pytest
import torch

from diffusionret_nb.cli import main
from diffusionret_nb.config import PARAMS, build_config, list_paramsets, load_paramset, params_dict
from diffusionret_nb.core import CheckpointError, ConfigError
from diffusionret_nb.models import RetrievalModel
from diffusionret_nb.registry import ARCHS, create_model, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_arch_choice_is_registered():
    assert set(PARAMS["arch"][1].metadata["choices"]) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_checkpoint_round_trip_and_arch_mismatch(arch, tmp_path):
    cfg = build_config(preset="tiny", arch=arch)
    torch.manual_seed(0)
    model = create_model(cfg)
    assert isinstance(model, RetrievalModel) and model.arch == arch
    path = tmp_path / "best.pt"
    torch.save(dict(model=model.state_dict(), params=params_dict(cfg), stage="stage1", arch=arch), path)
    back, back_cfg = load_model(path)
    assert type(back) is type(model) and back_cfg.model.arch == arch
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    other = next(a for a in sorted(ARCHS) if a != arch)
    with pytest.raises(CheckpointError, match=f"arch '{arch}'; it cannot be loaded as arch '{other}'"):
        load_model(path, arch=other)
    with pytest.raises(CheckpointError, match="not stage 2"):
        load_model(path, stage=2)


def test_weights_of_another_arch_are_refused_by_name(tmp_path):
    "A state dict that does not fit (here X-Pool weights stored under DiffusionRet's params) fails naming the arch."
    x = create_model(build_config(preset="tiny", arch="xpool"))
    torch.save(dict(model=x.state_dict(), params=params_dict(build_config(preset="tiny")), stage="stage1"), tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="does not match the 'diffusionret' stage-1 model"):
        load_model(tmp_path / "x.pt")


@pytest.mark.parametrize("content,needle", [(torch.randn(3), "holds a Tensor"), ({"weights": 1}, "needs 'model' and 'params'")])
def test_files_that_are_not_checkpoints(tmp_path, content, needle):
    torch.save(content, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=needle):
        load_model(tmp_path / "c.pt")


def test_arch_recipe_fills_only_unset_parameters():
    x = build_config(arch="xpool", lr=3e-5)
    assert (x.train.optimizer, x.train.lr, x.data.train_augment, x.model.xpool_dropout) == ("adamw", 3e-5, "xpool", 0.3)
    assert build_config(arch="clip4clip_meanp").train.ema == 0.0 and build_config().train.ema == 0.99
    assert build_config(**params_dict(x)["train"], **params_dict(x)["data"], **params_dict(x)["model"]) == x


def test_parameter_sets_are_valid_data():
    assert {"demo", "flickr8k", "xpool", "clip4clip_meanp", "clip4clip_seqtransf"} <= set(list_paramsets())
    for name in list_paramsets():
        d = load_paramset(name, with_doc=True)
        assert d["doc"] and set(d["why"]) <= set(d["params"]) | {"seed"}, name
    with pytest.raises(ConfigError, match="unknown parameter set"):
        load_paramset("nope")


def test_params_lists_archs_and_their_parameters(capsys):
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    assert "arch = 'diffusionret'" in out and "xpool_dropout = 0.3    [arch: xpool, dits]" in out
    assert "temporal = 'transformer'    [arch: diffusionret]" in out
    assert "xpool: optimizer='adamw'" in out and "clip4clip_meanp: " in out
