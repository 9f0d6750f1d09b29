"""NVFlare's in-time model selector that gets its best metric back when a job resumes an earlier one."""

from __future__ import annotations

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector

from spleen_flare.resume import RESUME_POINT_PROP, RESUMED_EVENT, ResumePoint


class ResumableModelSelector(IntimeModelSelector):
    """``IntimeModelSelector`` that, on a resume, starts from the old job's best metric: a later global model is
    saved as the best only if it beats every model of both jobs, not just those of the resumed one."""

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == RESUMED_EVENT:
            point = fl_ctx.get_prop(RESUME_POINT_PROP)
            if isinstance(point, ResumePoint) and point.best_metric is not None:
                self.best_raw_val_metric = point.best_metric
                self.best_val_metric = -point.best_metric if self.negate_key_metric else point.best_metric
                self.log_info(fl_ctx, f"resumed: best {self.key_metric} so far {point.best_metric}")
            return
        super().handle_event(event_type, fl_ctx)
