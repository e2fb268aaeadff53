"""Model zoo: plain-torch CIFAR-style networks behind a registry."""

from . import densenet, mobilenet, pyramidnet, resnet, resnet_cifar, small, vit, wide_resnet  # noqa: F401  (registers the models)
from . import bayes_models  # noqa: F401  (registers the Bayesian models: bayes-mlp, bayes-lenet, bayes-resnet*)
from .ensemble import Ensemble, create_ensemble, member_param_groups  # noqa: F401  (registers the ensembles)
from .registry import (check_model_options, count_parameters, create_model, describe_models, list_models,
                       model_from_factory, register_model)

__all__ = ["create_model", "list_models", "register_model", "count_parameters", "describe_models",
           "check_model_options", "model_from_factory"]
