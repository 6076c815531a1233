"""GlobLocNet's outputs and the model file's checks."""
import pytest
import torch

from globloc_ros.modelfile import ModelFileError, load_model, save_model
from globloc_ros.net import GlobLocNet, NetConfig


def _K(W=160, H=120):
    return torch.tensor([[0.8 * W, 0, (W - 1) / 2], [0, 0.8 * W, (H - 1) / 2], [0, 0, 1.0]])[None]


def test_three_heads_shapes_and_ranges():
    cfg = NetConfig(input_size=(160, 120), scene_centre=(1.0, 2.0, 0.5), scene_scale=3.0, depth_max=8.0)
    net = GlobLocNet(cfg)
    out = net(torch.rand(2, 3, 120, 160) * 255, _K().expand(2, 3, 3))
    assert out.scene_coords.shape == (2, 3, 15, 20) and out.depth.shape == (2, 1, 15, 20)
    assert out.weights.shape == (2, 300) and torch.allclose(out.weights.sum(1), torch.ones(2))
    assert (out.depth > 0).all() and (out.depth <= 8.0).all()
    assert out.cam_coords.shape == (2, 300, 3)
    assert torch.allclose(out.cam_coords[..., 2], out.depth.flatten(1))
    assert out.pose.R.shape == (2, 3, 3) and torch.isfinite(out.pose.t).all()


def test_gradients_reach_all_three_heads():
    net = GlobLocNet(NetConfig(input_size=(64, 48)))
    out = net(torch.rand(1, 3, 48, 64) * 255, _K(64, 48))
    (out.pose.t.square().sum() + out.pose.R[:, 0, 1].sum()).backward()
    for head in (net.scene_head, net.depth_head, net.weight_head):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_depth_is_for_the_canonical_focal_length():
    """The same image seen through a lens twice as long shows surfaces twice as far away; without depth_focal
    (older model files) the depth ignores K."""
    x = torch.rand(1, 3, 48, 64) * 255
    zoomed = _K(64, 48).clone()
    zoomed[:, :2, :2] *= 2
    for focal, ratio in ((0.8 * 64, 2.0), (0.0, 1.0)):
        net = GlobLocNet(NetConfig(input_size=(64, 48), depth_focal=focal, depth_max=100.0))
        d1, d2 = net.heads(x, _K(64, 48))[2], net.heads(x, zoomed)[2]
        assert torch.allclose(d2, ratio * d1)
        assert torch.allclose(net(x, _K(64, 48)).depth, d1)  # forward gives the heads' depth


@pytest.mark.parametrize('norm, dilations', [('none', (1, 2, 4)), ('group', (1, 2))])
def test_model_file_round_trip(tmp_path, norm, dilations):
    net = GlobLocNet(NetConfig(input_size=(64, 48), scene_scale=2.5, norm=norm, dilations=dilations))
    save_model(net, tmp_path / 'm.pt', meta={'steps': 3})
    net2, meta = load_model(tmp_path / 'm.pt')
    assert meta == {'steps': 3} and net2.config == net.config
    x = torch.rand(1, 3, 48, 64) * 255
    assert torch.equal(net(x, _K(64, 48)).scene_coords, net2(x, _K(64, 48)).scene_coords)


def test_group_norm_is_per_sample():
    """A frame's output must not depend on the other frames of its batch (as batch statistics would make it)."""
    net = GlobLocNet(NetConfig(input_size=(64, 48), norm='group')).eval()
    x = torch.rand(3, 3, 48, 64) * 255
    alone = net(x[:1], _K(64, 48)).scene_coords
    assert torch.allclose(net(x, _K(64, 48).expand(3, 3, 3)).scene_coords[:1], alone, atol=1e-5)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())


def test_config_of_an_older_model_file_means_no_norm():
    """Model files written before `norm` and `dilations` existed hold plain stacks with dilations 1, 2, 4."""
    d = NetConfig(input_size=(64, 48)).to_dict()
    del d['norm'], d['dilations']
    cfg = NetConfig.from_dict(d)
    assert cfg.norm == 'none' and cfg.dilations == (1, 2, 4)
    net = GlobLocNet(cfg)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())


def test_model_file_errors(tmp_path):
    good = tmp_path / 'good.pt'
    save_model(GlobLocNet(NetConfig(input_size=(64, 48))), good)
    with pytest.raises(ModelFileError, match='not found'):
        load_model(tmp_path / 'missing.pt')
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match='truncated.pt'):
        load_model(truncated)
    foreign = tmp_path / 'foreign.pt'
    torch.save({'weights': torch.zeros(3)}, foreign)
    with pytest.raises(ModelFileError, match='not a globloc model'):
        load_model(foreign)
    d = torch.load(good, weights_only=True)
    d['version'] = 99
    torch.save(d, tmp_path / 'future.pt')
    with pytest.raises(ModelFileError, match='version 99'):
        load_model(tmp_path / 'future.pt')
    d['version'] = 1
    d['config']['widths'] = (8, 8, 8)
    torch.save(d, tmp_path / 'mismatch.pt')
    with pytest.raises(ModelFileError, match='do not fit'):
        load_model(tmp_path / 'mismatch.pt')
