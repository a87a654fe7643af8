"""The CUDA suite (``make test-gpu``): every path the project claims on GPU, against CPU float32.

Each test computes its reference on the CPU in float32 in the same test and compares the CUDA
result with it. Without a CUDA device every test here is skipped; ``-m cuda`` selects them.
TF32 is switched off for the exact comparisons (cuDNN and cuBLAS would otherwise round
float32 matmuls and convolutions to 10-bit mantissas); the autocast tests compare at the
precision autocast gives.
"""

import copy
import os
import socket

import numpy as np
import pytest
import torch
from utils import TinyNet, randomize_norms

import tsm_surgery

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)")]

SEGMENTS = 4
SIZE = 32
EXACT = 1e-4  # float32 on two devices: summation order only
LOW = 0.05  # autocast outputs against float32, relative to the largest value


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel(a, b):
    a, b = torch.as_tensor(a).detach().double().cpu(), torch.as_tensor(b).detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _resnet18(classes=5):
    import torchvision

    return randomize_norms(torchvision.models.resnet18(num_classes=classes)).eval()


def _clips(n=2):
    return torch.randn(n * SEGMENTS, 3, SIZE, SIZE)


def _grads(model):
    return torch.cat([p.grad.detach().flatten().double().cpu() for p in model.parameters()])


# ------------------------------------------------------------------ convert
def test_convert_on_cuda_equals_cpu():
    model = _resnet18()
    x = _clips()
    cpu_net = tsm_surgery.convert(model, SEGMENTS)
    with torch.no_grad():
        reference = cpu_net(x)
    converted_on_gpu = tsm_surgery.convert(copy.deepcopy(model).cuda(), SEGMENTS)  # traced with CUDA tensors
    moved = copy.deepcopy(cpu_net).cuda()  # converted on CPU, then moved
    for net in (converted_on_gpu, moved):
        assert all(p.is_cuda for p in net.parameters()) and all(b.is_cuda for b in net.buffers())
        with torch.no_grad():
            assert _rel(net(x.cuda()), reference) <= EXACT
    # Training: forward and backward give the CPU gradients.
    cpu_net.train()
    moved.train()
    cpu_net(x).square().mean().backward()
    moved(x.cuda()).square().mean().backward()
    assert _rel(_grads(moved), _grads(cpu_net)) <= EXACT


def test_channels_last_on_cuda():
    net = tsm_surgery.convert(_resnet18(), SEGMENTS)
    x = _clips()
    with torch.no_grad():
        reference = net(x)
    gpu = copy.deepcopy(net).cuda().to(memory_format=torch.channels_last)
    layouts = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: layouts.append(out.is_contiguous(
        memory_format=torch.channels_last))) for m in gpu.modules() if isinstance(m, tsm_surgery.TemporalShift)]
    with torch.no_grad():
        out = gpu(x.cuda().contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    assert _rel(out, reference) <= EXACT
    assert layouts and all(layouts)  # every shift kept the activation's layout


# ------------------------------------------------------------------ online
def test_online_stream_with_reset_mask_on_cuda():
    net = tsm_surgery.convert(_resnet18(), SEGMENTS, direction="uni")
    frames = torch.randn(5, 2, 3, SIZE, SIZE)  # 5 steps of 2 streams
    mask = torch.tensor([True, False])  # before step 3, stream 0 starts a new video

    def stream(online, device):
        outs = []
        with torch.no_grad():
            for t in range(frames.shape[0]):
                if t == 3:
                    online.reset(mask.to(device))
                outs.append(online(frames[t].to(device)).cpu())
        return torch.stack(outs), online.state

    reference, _ = stream(tsm_surgery.to_online(net), "cpu")
    gpu = tsm_surgery.to_online(net).cuda()
    outs, state = stream(gpu, "cuda")
    assert all(c.is_cuda for c in state.values())  # the caches followed the model
    assert _rel(outs, reference) <= EXACT
    # Independent check of the reset: stream 0 at step 4 is the offline network on frames 3..4.
    net.eval()
    net.n_segments = 2
    with torch.no_grad():
        offline = net(frames[3:5, 0]).view(2, -1)[-1]
    assert _rel(outs[4, 0], offline) <= EXACT


def test_explicit_state_step_on_cuda():
    online = tsm_surgery.to_online(tsm_surgery.convert(_resnet18(), SEGMENTS, direction="uni"))
    gpu = copy.deepcopy(online).cuda()
    state_cpu = online.init_state(2, frame_shape=(3, SIZE, SIZE))
    state_gpu = gpu.init_state(2, frame_shape=(3, SIZE, SIZE))  # device defaults to the parameters'
    assert all(c.is_cuda for c in state_gpu.values())
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, SIZE, SIZE)
            out_cpu, state_cpu = online.step(x, state_cpu)
            out_gpu, state_gpu = gpu.step(x.cuda(), state_gpu)
            assert _rel(out_gpu, out_cpu) <= EXACT
            for name in state_cpu:
                assert state_gpu[name].is_cuda and _rel(state_gpu[name], state_cpu[name]) <= EXACT
    with pytest.raises(ValueError, match="Hint"):  # a CPU state on a CUDA model is refused, not moved
        gpu.step(torch.randn(2, 3, SIZE, SIZE).cuda(), state_cpu)


# ------------------------------------------------------------------ torch.compile
def test_compile_converted_net_and_online_step_on_cuda():
    net = tsm_surgery.convert(randomize_norms(TinyNet()), SEGMENTS)
    x = _clips()
    with torch.no_grad():
        reference = net(x)
    gpu = copy.deepcopy(net).cuda()
    compiled = torch.compile(gpu, fullgraph=True)  # inductor's Triton kernels for the shift
    with torch.no_grad():
        assert _rel(compiled(x.cuda()), reference) <= EXACT
    net.train()
    gpu.train()
    net(x).square().mean().backward()
    torch.compile(gpu, fullgraph=True)(x.cuda()).square().mean().backward()
    assert _rel(_grads(gpu), _grads(net)) <= 1e-3

    online = tsm_surgery.to_online(tsm_surgery.convert(randomize_norms(TinyNet()), SEGMENTS, direction="uni"))
    online_gpu = copy.deepcopy(online).cuda()
    step = torch.compile(online_gpu.step_module, fullgraph=True)
    state = online.init_state(2, frame_shape=(3, SIZE, SIZE))
    caches = [c.cuda() for c in state.values()]
    with torch.no_grad():
        for _ in range(3):
            frame = torch.randn(2, 3, SIZE, SIZE)
            out, state = online.step(frame, state)
            out_gpu, *caches = step(frame.cuda(), *caches)
            assert _rel(out_gpu, out) <= EXACT
            assert all(_rel(c, ref) <= EXACT for c, ref in zip(caches, state.values()) if ref.abs().max() > 0)


# ------------------------------------------------------------------ autocast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    net = tsm_surgery.convert(_resnet18(), SEGMENTS, direction="uni")
    x = _clips()
    with torch.no_grad():
        reference = net(x)
    gpu = copy.deepcopy(net).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        low = gpu(x.cuda())
    assert low.dtype == dtype and _rel(low, reference) <= LOW
    # training step: float32 gradients close to the CPU float32 ones (a shallow net: ResNet-18's
    # batch statistics at 1x1 px in its last stage are too coarse in 8 bits of mantissa)
    tiny = tsm_surgery.convert(randomize_norms(TinyNet()), SEGMENTS).train()
    tiny_gpu = copy.deepcopy(tiny).cuda()
    tiny(x).square().mean().backward()
    with torch.autocast("cuda", dtype=dtype):
        out = tiny_gpu(x.cuda())
    out.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in tiny_gpu.parameters())
    assert _rel(_grads(tiny_gpu), _grads(tiny)) <= 0.1
    # online: the caches take the dtype autocast gives each site
    online = tsm_surgery.to_online(net)
    online_gpu = copy.deepcopy(online).cuda()
    frames = torch.randn(3, 1, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = [online(f) for f in frames]
        with torch.autocast("cuda", dtype=dtype):
            outs = [online_gpu(f.cuda()) for f in frames]
            state = online_gpu.init_state(1, frame_shape=(3, SIZE, SIZE))
    assert all(c.dtype == dtype and c.is_cuda for c in online_gpu.state.values())
    assert all(c.dtype == dtype for c in state.values())
    assert all(_rel(o, r) <= LOW for o, r in zip(outs, reference))


# ------------------------------------------------------------------ DDP over NCCL
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, net, x, out_dir):
    import torch.distributed as dist

    torch.backends.cudnn.allow_tf32 = False  # a fresh process: the fixture did not run here
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(rank)
        model = torch.nn.parallel.DistributedDataParallel(net.cuda(rank).train(), device_ids=[rank])
        part = x.chunk(world)[rank].cuda(rank)  # whole clips per rank
        model(part).square().mean().backward()
        if rank == 0:
            torch.save([p.grad.cpu() for p in model.module.parameters()], os.path.join(out_dir, "grads.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_over_nccl_averages_the_cpu_gradients(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    world = torch.cuda.device_count()
    # GroupNorm is per sample: each rank's clips give the same gradients as in the full batch.
    net = tsm_surgery.convert(randomize_norms(TinyNet(norm="group")), SEGMENTS).train()
    x = torch.randn(world * 2 * SEGMENTS, 3, SIZE, SIZE)
    reference = copy.deepcopy(net)
    reference(x).square().mean().backward()  # equal shares: the mean of the ranks' means
    mp.spawn(_ddp_worker, args=(world, _free_port(), net, x, str(tmp_path)), nprocs=world, join=True)
    grads = torch.load(tmp_path / "grads.pt")
    expected = [p.grad for p in reference.parameters()]
    assert len(grads) == len(expected)
    assert _rel(torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in expected])) <= EXACT


# ------------------------------------------------------------------ ONNX export of a CUDA model
def test_onnx_export_of_a_cuda_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tsm_surgery.integrations.export import export_offline, export_online

    net = tsm_surgery.convert(_resnet18(), SEGMENTS, direction="uni")
    online = tsm_surgery.to_online(net)
    gpu_net, gpu_online = copy.deepcopy(net).cuda(), copy.deepcopy(online).cuda()
    export_offline(gpu_net, str(tmp_path / "offline.onnx"), frame_shape=(3, SIZE, SIZE))
    sidecar = export_online(gpu_online, str(tmp_path / "online.onnx"), frame_shape=(3, SIZE, SIZE))
    x = _clips()
    with torch.no_grad():
        reference = net.eval()(x)
    session = ort.InferenceSession(str(tmp_path / "offline.onnx"), providers=["CPUExecutionProvider"])
    assert _rel(session.run(None, {"clips": x.numpy()})[0], reference) <= EXACT
    session = ort.InferenceSession(str(tmp_path / "online.onnx"), providers=["CPUExecutionProvider"])
    caches = {s["input"]: np.zeros(s["shape"], np.float32) for s in sidecar["state"]}
    state = online.init_state(1, frame_shape=(3, SIZE, SIZE))
    with torch.no_grad():
        for _ in range(3):
            frame = torch.randn(1, 3, SIZE, SIZE)
            names = [o.name for o in session.get_outputs()]
            results = dict(zip(names, session.run(None, {"frames": frame.numpy(), **caches})))
            out, state = online.step(frame, state)
            assert _rel(results["output"], out) <= EXACT
            caches = {s["input"]: results[s["output"]] for s in sidecar["state"]}


# ------------------------------------------------------------------ the plugin through mmengine's Runner
AMP_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "tsm_surgery_r50_1x1x8_50e_kinetics400_amp.py")


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "amp-config"])
def test_runner_trains_and_evaluates_on_cuda(tmp_path, amp):
    pytest.importorskip("mmaction")
    from mmengine.config import Config
    from utils import make_dataset, write_config

    from tsm_surgery.integrations.training import runner as api

    data = make_dataset(str(tmp_path / "videos"), per_class=2, frames=8)
    extra = ""
    if amp:  # the AMP config's wrapper settings on the tiny data and model
        wrapper = Config.fromfile(AMP_CONFIG).optim_wrapper
        extra = f"""
    optim_wrapper = dict(type={wrapper.type!r}, dtype={wrapper.dtype!r}, loss_scale={wrapper.loss_scale!r},
                         constructor='TSMSurgeryOptimWrapperConstructor',
                         optimizer=dict(type='SGD', lr=0.002, momentum=0.9, weight_decay=1e-4))
    """
    config = write_config(str(tmp_path / "tiny.py"), data, num_frames=4, max_epochs=1, extra=extra)
    runner = api.train(config, work_dir=str(tmp_path / "work"))
    model = runner.model
    assert all(p.is_cuda for p in model.parameters())
    assert type(runner.optim_wrapper).__name__ == ("AmpOptimWrapper" if amp else "OptimWrapper")
    loss = runner.message_hub.get_scalar("train/loss").current()
    assert np.isfinite(loss) and loss > 0
    assert 0.0 <= runner.message_hub.get_scalar("val/acc/top1").current() <= 1.0
    # Evaluation: the trained model's scores on CUDA equal its CPU float32 copy's.
    batch = next(iter(runner.val_dataloader))
    model.eval()
    with torch.no_grad():
        gpu_scores = torch.stack([s.pred_score for s in model.val_step(batch)])
        cpu_model = copy.deepcopy(model).cpu()
        cpu_scores = torch.stack([s.pred_score for s in cpu_model.val_step(batch)])
    assert gpu_scores.is_cuda and _rel(gpu_scores, cpu_scores) <= 1e-3
