"""The report's prose: how memory is counted and where the shift's remaining cost comes from.

Every sentence that states a number takes it from the run; what only holds on one device
(oneDNN and glibc malloc on CPU) is written for that device only.
"""


from .headline import mib, ms, pct, ratio, times
from .measure import CONTROL
from .running import BenchResult

__all__ = ["memory_method", "remaining_cost"]


def memory_method(r: BenchResult) -> str:
    kept = r.memory.get("ours, shift outputs kept")
    base = r.memory.get("2d")
    kept_ratio = None if kept is None or not base else kept / base
    if r.settings.device == "cuda":
        method = ("Peak memory method: `torch.cuda.max_memory_allocated` during one training step (forward and "
                  "backward), less what was allocated before the step, plus the model's parameters, gradients and "
                  "input; other models on the GPU do not count. ")
    else:
        method = ("Peak memory method: a `TorchDispatchMode` counts the bytes of every tensor storage an op "
                  "creates during one training step (forward and backward) and a finalizer on each storage "
                  "subtracts them when it is freed; parameters, their gradients and the input are counted from "
                  "the start. The peak of that running sum is reported. Kernel-internal scratch buffers are not "
                  "tensors and are not counted. ")
    return (method + f"Ours with the shift outputs kept for backward (`net.recompute_shifts = False`): {mib(kept)} "
            f"({times(kept_ratio)} the 2D model): the first conv of each branch saves its input for the weight "
            "gradient, and a shifted copy is one extra activation per site; by default the shift and the conv it "
            "feeds are one autograd unit that saves the block input (alive anyway, the shortcut) and moves its "
            "slots in place again in backward.")


def remaining_cost(r: BenchResult) -> list[str]:
    """The bullets of *Where the remaining cost comes from*."""
    cpu = r.settings.device == "cpu"
    share = r.profile[1] if r.profile else None
    ours = r.op_eager.get("ours", float("nan"))
    bullets = [
        "The shift cannot be free in an out-of-place network: the residual shortcut needs the unshifted "
        "tensor, so the branch's first layer must read a shifted copy. One read and one write of each site's "
        "input is the floor; measured as a plain `clone` of every site input it is "
        f"{pct(r.copy_floor_s / r.base_2d_s)} of the 2D forward here, and ours costs {ours / r.copy_floor_s:.2f}x "
        "that floor (no zero fill, every output element written once). The op-level figure is a minimum over "
        "repetitions on a warm cache; inside the network the input arrives from the previous block and the copy "
        "gets a fresh buffer, so it costs more"
        + (f": the profile below puts the shifts at {pct(share)} of the eval forward's time." if share is not None
           else "."),
    ]
    if cpu:
        bullets.append(
            "Under `torch.compile` the convolutions stay oneDNN extern kernels, run channels-last, so inductor "
            "cannot fold the shift into a convolution's input read. The shift compiles to one select over the "
            "batch rolled by a frame (`where`, not `cat`: inductor on CPU lays a `cat` out contiguous, which cost "
            "two layout transposes per site and 1.3-1.4x end to end), fused into the kernel that produces the "
            "block input. That loop still reads three frames to write one (`where` evaluates both of its sides), "
            "which is the compiled op-level figure; it runs once per site on data the previous loop just wrote.")
    bullets.append(_noise(r))
    if r.op_in_place_s is not None:
        bullets.append(
            "Eval moves each site's slots in place around the branch's first layer and puts them back: four "
            "kernels on strided views computed once per shape (the slots into a scratch, every slot's shifted "
            "frames back in one copy, the clip-end frames zeroed in one, the restore), 0.75 of a clone's bytes. "
            f"Here it cost {r.op_in_place_s / r.copy_floor_s:.2f}x the `clone`. Both are timed warm on the same "
            "tensor; the in-place form touches a quarter of it plus a scratch of that size, the clone all of it "
            "and a new buffer, so their ratio depends on how much of that stays in cache, which can differ "
            "between processes on the same host.")
    bullets += [
        "A training step makes no shifted copy where a site's shift feeds a 2D conv: the two are one autograd "
        "unit that moves the slots of the block input in place around the conv's forward and again around its "
        "backward, and shifts the conv's input gradient in place (each a copy of 2/shift_div of the channels "
        "and its restore); what is left is those moves and their Python calls. Other sites copy three times: "
        "the shift, the reverse shift of the gradient and the rebuild in backward that keeps peak memory at "
        "the 2D model's. `net.recompute_shifts = False` runs every site as two ops and keeps the shifted copy.",
        "The online step swaps the cache into the site's activation in place around the branch's first layer "
        "(three copies of 1/8 of the channels, not a shifted copy of all of them); what is left is those copies, "
        "the state handling of `step` and per-call Python overhead, a larger share at one frame than in a clip "
        "batch.",
    ]
    if cpu:
        bullets.append(
            "Under glibc's default malloc settings every new activation of tens of MiB page-faults its memory in, "
            "and the converted network, with one more buffer per site, faults more (see *Page faults*). On CPU, run "
            "with jemalloc or tcmalloc (`LD_PRELOAD`), or `MALLOC_MMAP_THRESHOLD_=33554432 "
            "MALLOC_TRIM_THRESHOLD_=2147483647`, as this bench does by default.")
    bullets.append(
        "`convert()` traces the train and eval graphs and propagates shapes with fake tensors; the deep copy that "
        "keeps the caller's model untouched is a large part of what is left (see the split above).")
    return bullets


def _noise(r: BenchResult) -> str:
    """The noise bullet, from this run's A/A control and the machine it ran on."""
    m = r.machine
    where = f"the {m.device_name}" if r.settings.device == "cuda" else (
        f"this {m.cpu} host with {m.usable_cpus} usable CPUs and {m.torch_threads} torch threads")
    return (f"End-to-end wall-clock ratios on {where} move by as much as the A/A control shows (eval "
            f"{ratio(r.eval.get(CONTROL))}, training step {ratio(r.train.get(CONTROL))}, eval median "
            f"{ms(r.eval.get('2d', {}).get('median_s'))}); {m.busy_text()}. Where the control is further from "
            "1.00x than a target's margin, only the op-level, memory and compiled-kernel figures can judge it.")
