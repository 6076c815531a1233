"""GlobLocNet's outputs and the model file's checks."""
import pickle

import pytest
import torch

from globloc_ros.modelfile import ModelFileError, load_model, save_model
from globloc_ros.net import MOBILENET_V2_STAGES, GlobLocNet, NetConfig, load_imagenet


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
    for name, content in {'text.pt': b'# a README\n', 'pickle.pt': pickle.dumps(object())}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelFileError, match=name) as e:
            load_model(tmp_path / name)
        assert '\n' not in str(e.value), str(e.value)  # one line, not torch's pages of advice
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


def _torchvision_style_mobilenet_v2(gen: torch.Generator) -> dict:
    """A random state dict with torchvision's mobilenet_v2 `features.*` keys, shapes and batch-norm statistics."""
    sd = {}

    def conv_bn(conv: str, bn: str, cout: int, cin_per_group: int) -> None:
        k = (3, 3) if cin_per_group in (1, 3) else (1, 1)
        fan_in = cin_per_group * k[0] * k[1]
        sd[conv + '.weight'] = torch.randn(cout, cin_per_group, *k, generator=gen) / fan_in ** 0.5
        sd[bn + '.weight'] = torch.rand(cout, generator=gen) + 0.5
        sd[bn + '.bias'] = torch.randn(cout, generator=gen) * 0.1
        sd[bn + '.running_mean'] = torch.randn(cout, generator=gen) * 0.1
        sd[bn + '.running_var'] = torch.rand(cout, generator=gen) + 0.5

    conv_bn('features.0.0', 'features.0.1', 32, 3)
    i, cin = 1, 32
    for t, c, n, _ in MOBILENET_V2_STAGES:
        for _ in range(n):
            p, hidden = f'features.{i}.conv', cin * t
            layers = ([] if t == 1 else [(hidden, cin)]) + [(hidden, 1), (c, hidden)]
            for j, (cout, cin_g) in enumerate(layers[:-1]):
                conv_bn(f'{p}.{j}.0', f'{p}.{j}.1', cout, cin_g)
            conv_bn(f'{p}.{len(layers) - 1}', f'{p}.{len(layers)}', *layers[-1])
            i, cin = i + 1, c
    return sd


def _reference_mobilenet_v2(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's structure with its batch norms (eval): outputs after block 6 (stride 8) and 13 (stride 16)."""
    F = torch.nn.functional

    def cbn(x, conv, bn, stride=1, groups=1, act=True):
        w = sd[conv + '.weight']
        x = F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, groups)
        x = F.batch_norm(x, sd[bn + '.running_mean'], sd[bn + '.running_var'], sd[bn + '.weight'],
                         sd[bn + '.bias'], False, 0.0, 1e-5)
        return F.relu6(x) if act else x

    x = cbn(x, 'features.0.0', 'features.0.1', 2)
    i, cin = 1, 32
    for t, c, n, s in MOBILENET_V2_STAGES:
        for k in range(n):
            p, stride, y, j = f'features.{i}.conv', s if k == 0 else 1, x, 0
            if t != 1:
                y, j = cbn(y, f'{p}.0.0', f'{p}.0.1'), 1
            y = cbn(y, f'{p}.{j}.0', f'{p}.{j}.1', stride, groups=cin * t)
            y = cbn(y, f'{p}.{j + 1}', f'{p}.{j + 2}', act=False)
            x = x + y if stride == 1 and cin == c else y
            if i == 6:
                s8 = x
            i, cin = i + 1, c
    return s8, x


def test_imagenet_weights_fold_batch_norm_exactly():
    gen = torch.Generator().manual_seed(0)
    sd = _torchvision_style_mobilenet_v2(gen)
    net = GlobLocNet(NetConfig(input_size=(64, 48), backbone='mobilenet_v2', norm='group'))
    load_imagenet(net.backbone, sd)
    x = torch.randn(2, 3, 48, 64, generator=gen)
    want8, want16 = _reference_mobilenet_v2(sd, x)
    got = torch.nn.functional.relu6(net.backbone.stem(x))
    for i, block in enumerate(net.backbone.blocks):
        got = block(got)
        if i == 5:
            torch.testing.assert_close(got, want8, rtol=1e-4, atol=1e-5 * want8.abs().max().item())
    assert got.shape == (2, 96, 3, 4)
    torch.testing.assert_close(got, want16, rtol=1e-4, atol=1e-5 * want16.abs().max().item())
    assert net.heads(x * 50 + 120, torch.eye(3)[None].repeat(2, 1, 1))[1].shape == (2, 3, 6, 8)


def test_imagenet_weights_of_another_network_are_refused():
    sd = _torchvision_style_mobilenet_v2(torch.Generator().manual_seed(0))
    net = GlobLocNet(NetConfig(input_size=(64, 48), backbone='mobilenet_v2'))
    with pytest.raises(ValueError, match='features.3.conv.1.0.weight is'):
        load_imagenet(net.backbone, {**sd, 'features.3.conv.1.0.weight': torch.zeros(5, 1, 3, 3)})
    with pytest.raises(ValueError, match='missing features.0.1.running_var'):
        load_imagenet(net.backbone, {k: v for k, v in sd.items() if k != 'features.0.1.running_var'})
