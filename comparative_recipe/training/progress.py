"""Where a run is (steps, epochs, the best validation result), saved in every checkpoint."""

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

# Validation metrics where higher is better (all others, losses, are lower-is-better): prefixes of
# accuracy and macro-F1 (classification), exact match and token F1 (generative QA).
HIGHER_IS_BETTER = ("val_accuracy", "val_macro_f1", "val_exact_match", "val_f1")


@dataclass
class TrainingProgress:
    """Where a run is: saved in every checkpoint's recipe state, restored on resume.

    best: the best validation result so far ({"metric", "value", "step"}), or None.
    """

    seed: int
    epochs_run: int = 0
    global_step: int = 0
    steps_into_epoch: int = 0
    best: Optional[Dict[str, Any]] = None

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"seed {self.seed} differs from the checkpoint's {state['seed']}: resume with "
                f"seed={state['seed']} (the data order, masks and crops are keyed by it)"
            )
        self.epochs_run = state["epochs_run"]
        self.global_step = state["global_step"]
        self.steps_into_epoch = state["steps_into_epoch"]
        self.best = state.get("best")

    def finish_step(self) -> None:
        """An optimizer step is done."""
        self.global_step += 1
        self.steps_into_epoch += 1

    def finish_epoch(self) -> None:
        self.epochs_run += 1
        self.steps_into_epoch = 0

    def due(self, every_n_steps: Optional[int]) -> bool:
        """Whether something done every ``every_n_steps`` optimizer steps (None or 0: never) is
        due after the current step."""
        return bool(every_n_steps) and self.global_step % every_n_steps == 0

    def record_best(self, metrics: Dict[str, float], name: str) -> bool:
        """Records ``metrics[name]`` as the best result if it strictly improves on it
        (accuracies, macro-F1, exact match and token F1 higher, losses lower; on a tie the earlier result stays). A NaN never
        improves anything. Returns whether it was recorded."""
        if name not in metrics:
            raise ValueError(
                f"validation.metric {name!r} is not computed; choose one of {sorted(metrics)}"
            )
        value = float(metrics[name])
        if math.isnan(value):
            return False
        if self.best is not None:
            sign = 1.0 if name.startswith(HIGHER_IS_BETTER) else -1.0
            if not sign * (value - self.best["value"]) > 0:
                return False
        self.best = {"metric": name, "value": value, "step": self.global_step}
        return True
