"""What the demo shows: the frame-by-frame stream, the results table and the training curves."""

from pathlib import Path

import numpy as np
import torch

from . import synth_data

__all__ = ["stream_video", "format_table", "plot_curves"]


@torch.no_grad()
def stream_video(model, inputs: torch.Tensor) -> dict:
    """Streams one clip frame by frame through the online form of a uni TSM recognizer.

    The recognizer's backbone must be a ``direction='uni'`` ``TSMSurgeryBackbone``. At frame t
    the online backbone sees only frame t plus its caches; the head averages the features of
    frames 0..t (TSN's consensus, computed as a running mean), which is the offline network's
    prediction on the clip 0..t.

    Args:
        model: the trained ``Recognizer2D``.
        inputs: the preprocessed clip, ``(T, C, H, W)`` float.

    Returns:
        ``{'online': bool, 'per_frame': [...], 'max_abs_diff_vs_offline': float}``; each
        per-frame entry holds the frame's own top class and the running top class and its
        probability.
    """
    import tsm_surgery

    model.eval()
    backbone, head = model.backbone, model.cls_head
    net = backbone.net
    to_online = getattr(tsm_surgery, "to_online", None)
    online = to_online(net) if to_online is not None else None
    if online is not None:
        online.eval()
        online.reset()
    feats = []
    per_frame = []
    for t in range(inputs.shape[0]):
        if online is not None:
            feat = online(inputs[t:t + 1])
        else:  # no online form available: the offline uni network on the growing prefix
            net.n_segments = t + 1
            feat = net(inputs[:t + 1])[t:t + 1]
        if isinstance(feat, dict):
            feat = next(iter(feat.values()))
        feats.append(feat)
        frame_logits = head(feat, num_segs=1)[0]
        running = head(torch.cat(feats), num_segs=t + 1)[0]
        prob = running.softmax(-1)
        per_frame.append({"frame": t, "frame_top": int(frame_logits.argmax()),
                          "running_top": int(prob.argmax()), "running_prob": float(prob.max()),
                          "running_probs": [round(float(p), 4) for p in prob]})
    # The definition of the online form: equal to the offline uni network on the whole clip.
    net.n_segments = inputs.shape[0]
    offline = head(backbone(inputs), num_segs=inputs.shape[0])[0]
    diff = float((offline - running).abs().max())
    return {"online": online is not None, "per_frame": per_frame, "max_abs_diff_vs_offline": diff}


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------

def format_table(results: dict[str, dict]) -> str:
    """The results table: test top-1 overall, per pair and within pair, per model."""
    pairs = [p[0] for p in synth_data.PAIRS]
    head = f"{'model':<9}{'top-1':>7}" + "".join(f"{p + ' (within)':>20}" for p in pairs)
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        m = res["test"]
        row = f"{name:<9}{100 * m['pair/top1']:6.1f}%"
        for p in pairs:
            row += f"{100 * m[f'pair/{p}_top1']:11.1f}% ({100 * m[f'pair/{p}_within']:4.1f}%)"
        lines.append(row)
    lines.append("top-1: 6-way test accuracy; per pair: 6-way top-1 on the pair's videos (within: deciding "
                 "between the pair's two classes only, chance = 50%)")
    return "\n".join(lines)


def plot_curves(results: dict[str, dict], path: Path) -> None:
    """Saves the training-loss and validation top-1 curves of every model as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        loss = np.array(res["curves"]["train_loss"])
        if len(loss):
            k = max(1, len(loss) // 40)  # smooth over ~1/40 of the run
            smooth = np.convolve(loss[:, 1], np.ones(k) / k, mode="valid")
            ax_loss.plot(loss[k - 1:, 0], smooth, label=name)
        acc = np.array(res["curves"]["val_top1"])
        if len(acc):
            ax_acc.plot(acc[:, 0], 100 * acc[:, 1], marker="o", label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation top-1 (6 classes)", ylim=(0, 100))
    ax_acc.axhline(50, color="grey", ls=":", lw=1)
    ax_acc.text(0.02, 51, "bag of frames: 50%", color="grey", fontsize=8, transform=ax_acc.get_yaxis_transform())
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
