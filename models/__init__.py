"""Model zoo: ``create_model(name)`` builds any registered family member.

Importing the package registers every family (one module per family).
"""

from models import lenet, resnet  # noqa: F401  (imported to register their models)
from models import senet  # noqa: F401
from models import resnetv2  # noqa: F401
from models import wrn  # noqa: F401
from models import densenet  # noqa: F401
from models import nfnet  # noqa: F401
from models import alexnet  # noqa: F401
from models import vgg  # noqa: F401
from models import inception  # noqa: F401
from models import inception_v4  # noqa: F401
from models import mobilenet  # noqa: F401
from models import squeezenet  # noqa: F401
from models import mnasnet  # noqa: F401
from models import shufflenet  # noqa: F401
from models.convert import ConversionError, convert_state_dict, export_state_dict
from models.registry import (
    ModelCfg,
    UnknownModelError,
    create_model,
    get_model_cfg,
    list_models,
    register_model,
)

__all__ = [
    'ConversionError',
    'ModelCfg',
    'UnknownModelError',
    'convert_state_dict',
    'create_model',
    'export_state_dict',
    'get_model_cfg',
    'list_models',
    'register_model',
]
