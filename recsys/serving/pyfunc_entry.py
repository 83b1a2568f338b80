"""What MLflow runs to load the exported ranking model: the model is logged as code, never pickled."""

from mlflow.models import set_model

from recsys.serving.pyfunc_model import RankingModel

set_model(RankingModel())
