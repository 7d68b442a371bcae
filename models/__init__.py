"""Model zoo: ``create_model(name)`` builds any registered family member.

Importing the package registers every family (one module per family; importing each
registers its models and weight name map). Every model keeps the contract of
:class:`models.layers.ImageClassifier`; its registry cfg declares its classifier and first
conv (:func:`classifier_paths`).
"""

from models import (  # noqa: F401  (imported to register their models)
    alexnet,
    densenet,
    efficientnet,
    inception,
    inception_v3,
    inception_v4,
    lenet,
    mnasnet,
    mobilenet,
    nasnet,
    nfnet,
    resnet,
    resnetv2,
    senet,
    shufflenet,
    squeezenet,
    vgg,
    wrn,
    xception,
)
from models.convert import ConversionError, convert_state_dict, export_state_dict
from models.layers import ModelFieldError
from models.registry import (
    MODEL_ALIASES,
    ModelCfg,
    UnknownModelError,
    classifier_paths,
    create_model,
    get_model_cfg,
    get_model_family,
    in_classifier,
    list_models,
    register_model,
    resolve_model_name,
)

__all__ = [
    'MODEL_ALIASES',
    'ConversionError',
    'ModelCfg',
    'ModelFieldError',
    'UnknownModelError',
    'classifier_paths',
    'convert_state_dict',
    'create_model',
    'export_state_dict',
    'get_model_cfg',
    'get_model_family',
    'in_classifier',
    'list_models',
    'register_model',
    'resolve_model_name',
]
