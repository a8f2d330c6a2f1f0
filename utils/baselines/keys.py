"""The baseline defences' own options (``train.py --defense``): their keys, defaults and
ranges, and which defence each belongs to. Declared here, not in train.py, because the demo
compares a victim's stored options with its recipe's and must not import a script."""

from __future__ import annotations

from utils.options import FRACTION, GT0, NONNEG, POSITIVE, Key, Range

DEFENSE_OPTIONS: dict[str, Key] = {
    # ECLIPSE's paper names AT [Tao et al.] but publishes no budget: Madry et al.'s CIFAR-10 L∞ ball
    "at_eps": Key(8.0, "--defense at: L∞ budget of the PGD, in /255 units", range=Range(0, 255, low_open=True)),
    "at_steps": Key(
        10,
        "--defense at: PGD steps per batch (random start in the ball; Madry's PGD except that the attack sees "
        "the model in eval mode, as Tao et al.)",
        range=POSITIVE,
    ),
    "at_step_size": Key(2.0, "--defense at: PGD step size, in /255 units", range=GT0),
    # ECLIPSE names the baselines without their settings: each paper's own CIFAR-10 values
    "cutout_length": Key(
        16, "--defense cutout: side of the square set to the dataset's mean colour (DeVries & Taylor)", range=POSITIVE
    ),
    "cutout_holes": Key(1, "--defense cutout: squares per image", range=POSITIVE),
    "mixup_alpha": Key(1.0, "--defense mixup: λ ~ Beta(α, α) per batch (Zhang et al.)", range=NONNEG),
    "cutmix_beta": Key(1.0, "--defense cutmix: λ ~ Beta(β, β) (Yun et al.)", range=GT0),
    "cutmix_prob": Key(0.5, "--defense cutmix: share of the batches mixed (CutMix's CIFAR commands)", range=FRACTION),
    # at 1 or 2 epochs the two lr drops fall on the same epoch
    "op_epochs": Key(20, "--defense op: epochs of the linear model (lr ×0.1 at 50 % and 75 % of them)", range=Range(3)),
    "op_lr": Key(0.1, "--defense op: SGD learning rate of the linear model (no momentum)", range=GT0),
    "op_batch_size": Key(1024, "--defense op: batch size of the linear model", range=POSITIVE),
}
# each defence's own options, stored only with it: the other runs' settings stay as they were
DEFENSE_KEYS: dict[str, tuple[str, ...]] = {
    "at": ("at_eps", "at_steps", "at_step_size"),
    "cutout": ("cutout_length", "cutout_holes"),
    "mixup": ("mixup_alpha",),
    "cutmix": ("cutmix_beta", "cutmix_prob"),
    "op": ("op_epochs", "op_lr", "op_batch_size"),
}
