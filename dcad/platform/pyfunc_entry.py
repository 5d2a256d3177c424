"""Models-from-code entry point logged with every dcad MLflow model (see `pyfunc_model`)."""

import mlflow

from dcad.platform.pyfunc_model import DcadPyfuncModel

mlflow.models.set_model(DcadPyfuncModel())
