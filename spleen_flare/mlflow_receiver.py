"""NVFlare's MLflowReceiver, with its experiment marked as model training for MLflow 3's UI.

MLflow 3 opens an experiment without a kind as a GenAI experiment ("Traces 0", "No data available"): a new user
concludes the metrics are missing. MLflow keeps the kind in the experiment tag ``mlflow.experimentKind``; a job
config cannot carry that key (``nvflare job submit`` parses configs with pyhocon, which splits dotted keys), so the
receiver sets it on the experiment it created or found.
"""

from __future__ import annotations

from mlflow import MlflowClient
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


class ModelTrainingMLflowReceiver(MLflowReceiver):
    def initialize(self, fl_ctx: FLContext) -> None:
        super().initialize(fl_ctx)  # sets the tracking URI, creates or finds the experiment and the sites' runs
        if self.experiment_id is not None:
            MlflowClient().set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
