"""Ids and per-row statistics layout shared by the fused KD-loss kernels (Triton, C++ and CUDA).

Kept in sync with csrc/kd/kd_math.h.
"""
# Which loss a row kernel computes.
LOSS_KL = 0     # tau^2 KL(p || q): kd_kl, per_timestep_kl
LOSS_TSER = 1   # tau^2 KL(p || q) - lambda H(q at tau_H)
LOSS_HTA = 2    # tau^2 (w_head KL(p || q) + w_tail KL(q || p)), head/tail mask from the teacher

# Per-row statistics saved by the forward for the backward, [T, B, NUM_STATS] float32:
STAT_LSE_S = 0  # log-sum-exp of the student logits / tau
STAT_LSE_U = 1  # log-sum-exp of the teacher logits / tau
STAT_KL_F = 2   # KL(p || q)
STAT_AUX0 = 3   # TSER: LSE of student / tau_H      HTA: w_head (detached)
STAT_AUX1 = 4   # TSER: entropy H(q at tau_H)        HTA: KL(q || p)
NUM_STATS = 5

# Per-teacher-row HTA head description, [Tt, B, 3] int32: the head is every class i with
#   key(z_i) > KEY_CROSS, or key(z_i) == KEY_CROSS and i < IDX_CROSS, or i == IDX_TOP,
# where key() maps a float32 logit to an order-preserving int32 and (KEY_CROSS, IDX_CROSS) is the
# class at which the teacher's sorted inclusive cumulative probability first reaches head_threshold.
# [ours] The head is the classes whose cumulative probability is below head_threshold minus this
# margin: a sum equal to the threshold in exact arithmetic -- a flat teacher row (all logits equal,
# e.g. a zero-initialised teacher head) with C * head_threshold an integer -- then falls in the tail in
# every backend and dtype, as exact arithmetic says, instead of by the last bits of each one's
# rounding (C = 10 at 0.5: the float64 reference had five head classes, the cpp kernel four). It
# exceeds the float32 rounding of a cumulative sum and stays below 1/C for C < 2^20; what it moves
# to the tail is every class whose cumulative sum lies in [head_threshold - 2^-20, head_threshold):
# those exact ties, and sums that close to the threshold, which float rounding placed either way.
# The ops (kd_rows_forward, ...) compare with the threshold they are given; the public hta_kl hands
# them head_threshold - HTA_THRESHOLD_MARGIN.
HTA_THRESHOLD_MARGIN = 2.0 ** -20

HTA_KEY_CROSS = 0
HTA_IDX_CROSS = 1
HTA_IDX_TOP = 2
HTA_NUM = 3
