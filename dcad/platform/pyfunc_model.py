"""The code file MLflow logs with every dcad model (models-from-code); older models import DcadPyfuncModel from here."""

import mlflow

from dcad.platform.mlflow_model import DcadPyfuncModel

mlflow.models.set_model(DcadPyfuncModel())
