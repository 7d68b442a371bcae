"""EfficientNet-B7 on ImageNet-1k: configs/effnet_b0.py's recipe at 600 px, dropout 0.5.

Command (data options as for B0): python train.py --config configs/effnet_b7.py --workdir DIR

Expected result: 84.3% top-1 from the EMA weights (Tan & Le 2019, Table 2, AutoAugment).
Time: not measured (no accelerator); B0's 109,200 steps at B7's MACs (tools/model_table.py).
"""

from configs import effnet_b0


def get_config():
    return effnet_b0.scaled(7, resolution=600, drop_rate=0.5)
