"""Model zoo: ``create_model(name)`` builds any registered family member.

Importing the package registers every family (one module per family).
"""

from models import lenet, resnet  # noqa: F401  (imported to register their models)
# One module per family; importing each registers its models and weight name map.
from models import (  # noqa: F401
    senet,
    resnetv2,
    wrn,
    densenet,
    nfnet,
    alexnet,
    vgg,
    inception,
    inception_v4,
    efficientnet,
    mobilenet,
    squeezenet,
    mnasnet,
    xception,
    shufflenet,
    nasnet,
)
from models.convert import ConversionError, convert_state_dict, export_state_dict
from models.registry import (
    MODEL_ALIASES,
    ModelCfg,
    UnknownModelError,
    create_model,
    get_model_cfg,
    get_model_family,
    list_models,
    register_model,
    resolve_model_name,
)

__all__ = [
    'MODEL_ALIASES',
    'ConversionError',
    'ModelCfg',
    'UnknownModelError',
    'convert_state_dict',
    'create_model',
    'export_state_dict',
    'get_model_cfg',
    'get_model_family',
    'list_models',
    'register_model',
    'resolve_model_name',
]
