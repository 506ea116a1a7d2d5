"""Algorithm config: advantage estimator, policy-loss mode and its coefficients.

Field names follow the paper's symbols (r, omega_low, omega_high, k, beta, n); verl's key names are
accepted as aliases through `metadata={"aliases": (...)}`, which the job-config loader maps to the
field, so verl recipes move over unchanged (docs/algorithms.md lists them).
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Literal, Optional, Union

AdvantageEstimator = Literal["grpo", "rloo", "reinforce_pp", "gae"]
LossMode = Literal["vanilla", "ppo_clip", "clip_cov", "kl_cov"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


@dataclass
class AlgorithmConfig:
    # --- advantages ---
    advantage_estimator: AdvantageEstimator = field(
        default="grpo", metadata={"aliases": ("adv_estimator",)})
    # GRPO divides by the group's std; false gives Dr.GRPO's centred advantage.
    norm_by_std: bool = field(default=True, metadata={"aliases": ("norm_adv_by_std_in_grpo",)})
    # Groups whose n rewards are all equal (all right / all wrong) carry no signal. true: they
    # get no loss (the paper); "resample": also draw more prompts until each step holds
    # rollout.prompts_per_step informative groups (DAPO's dynamic sampling), for at most
    # resample_max_rounds extra generation rounds; false: keep them.
    filter_equal_groups: Union[bool, Literal["resample"]] = True
    resample_max_rounds: int = 4
    # Responses per prompt; a batch holds its groups contiguously: [prompt0 x n, prompt1 x n, ...].
    n: int = field(default=8, metadata={"aliases": ("rollout_n", "group_size")})
    gamma: float = 1.0  # discount (REINFORCE++, gae_advantages)
    # GAE lambda: for advantages.gae_advantages only; advantage_estimator=gae is refused (no critic)
    lam: float = field(default=1.0, metadata={"aliases": ("gae_lambda",)})

    # --- policy loss ---
    loss_mode: LossMode = "ppo_clip"
    eps_low: float = field(default=0.2, metadata={"aliases": ("clip_ratio_low",)})
    # eps_high > eps_low is DAPO's clip-higher.
    eps_high: float = field(default=0.2, metadata={"aliases": ("clip_ratio_high",)})
    # Dual clip (Ye et al. 2019): for A < 0 the loss is capped at -A * c. None: off.
    dual_clip_c: Optional[float] = field(default=None, metadata={"aliases": ("clip_ratio_c",)})
    aggregation: Aggregation = field(default="token-mean", metadata={"aliases": ("loss_agg_mode",)})

    # Clip-Cov: floor(r * N) tokens drawn uniformly from {omega_low <= Cov <= omega_high}.
    r: float = field(default=2e-4, metadata={"aliases": ("clip_cov_ratio",)})
    omega_low: float = field(default=1.0, metadata={"aliases": ("clip_cov_lb",)})
    omega_high: float = field(default=5.0, metadata={"aliases": ("clip_cov_ub",)})
    # KL-Cov: the top floor(k * N) tokens by Cov get + beta * |log pi - log pi_old|.
    k: float = field(default=2e-3, metadata={"aliases": ("kl_cov_ratio",)})
    beta: float = field(default=1.0, metadata={"aliases": ("ppo_kl_coef",)})
    # Which log-probs the covariance uses: "current" (an extra no-grad forward over the
    # mini-batch, what the paper's code does) or "rollout" (the old policy's, free).
    cov_policy: Literal["current", "rollout"] = "current"
    # Base seed of Clip-Cov's uniform draw; the trainer mixes in step and mini-batch index.
    seed: int = 0

    # Truncated importance sampling (TIS) against the rollout policy: each token's policy
    # term is weighted by min(pi_old / pi_rollout, cap), pi_rollout being the engine's
    # log-probs. Corrects for rollouts sampled by an older policy (asynchronous rollout is one
    # version behind) or by an engine whose numerics differ. None: off.
    rollout_is_cap: Optional[float] = field(default=None,
                                            metadata={"aliases": ("tis_imp_ratio_cap",)})

    # --- regularisers ---
    entropy_coef: float = field(default=0.0, metadata={"aliases": ("entropy_coeff",)})
    kl_ref_coef: float = field(default=0.0, metadata={"aliases": ("kl_loss_coef",)})
    kl_ref_estimator: Literal["k1", "k2", "k3"] = "k3"

    def __post_init__(self):
        def fail(name, requirement):
            alias = ALIASES_BY_FIELD.get(name)
            shown = f"{name} ({'/'.join(alias)})" if alias else name
            raise ValueError(f"{shown} {requirement}, got {getattr(self, name)!r}")

        if self.advantage_estimator == "gae":
            # advantages.gae_advantages exists, but GAE needs a value function per token and
            # the trainer has no critic to give one: refuse rather than fail at the first step.
            fail("advantage_estimator", "cannot be gae: GAE needs a critic (value model), which "
                                        "this trainer does not have; use grpo, rloo or "
                                        "reinforce_pp")
        if self.n < 1:
            fail("n", "must be >= 1")
        if not (isinstance(self.filter_equal_groups, bool)
                or self.filter_equal_groups == "resample"):
            fail("filter_equal_groups", "must be true, false or \"resample\"")
        if self.resample_max_rounds < 1:
            fail("resample_max_rounds", "must be >= 1")
        if self.advantage_estimator in ("grpo", "rloo") and self.n < 2:
            fail("n", f"must be >= 2 for advantage_estimator={self.advantage_estimator} "
                      "(a group baseline needs two responses)")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, "must be in [0, 1]")
        # eps_low = 1 is the authors' Clip-Cov setting (clip_ratio_low = 1): the ratio's lower
        # clip bound 1 - eps_low = 0 is never reached, so only the covariance clip acts.
        if not 0.0 <= self.eps_low <= 1.0:
            fail("eps_low", "must be in [0, 1]")
        if self.eps_high < 0.0:
            fail("eps_high", "must be >= 0")
        if self.rollout_is_cap is not None and self.rollout_is_cap < 1.0:
            fail("rollout_is_cap", "must be >= 1 (or null to disable the correction)")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            fail("dual_clip_c", "must be > 1 (or null to disable dual clip)")
        for name in ("r", "k"):
            if not 0.0 < getattr(self, name) < 1.0:
                fail(name, "must be in (0, 1)")
        if self.omega_low > self.omega_high:
            raise ValueError(f"omega_low (clip_cov_lb) = {self.omega_low} must be <= "
                             f"omega_high (clip_cov_ub) = {self.omega_high}")
        # entropy_coef is a bonus on the policy's entropy; a negative one would reward collapse
        for name in ("beta", "kl_ref_coef", "entropy_coef"):
            if getattr(self, name) < 0.0:
                fail(name, "must be >= 0")
        if not 0 <= self.seed < 2 ** 32:
            fail("seed", f"must be in [0, {2 ** 32})")


# {alias: field name}, and {field name: (aliases...)} for error messages.
ALIASES: Dict[str, str] = {
    alias: f.name for f in dataclasses.fields(AlgorithmConfig)
    for alias in f.metadata.get("aliases", ())
}
ALIASES_BY_FIELD: Dict[str, tuple] = {
    f.name: tuple(f.metadata["aliases"]) for f in dataclasses.fields(AlgorithmConfig)
    if f.metadata.get("aliases")
}
