"""EfficientNet-B1 on ImageNet-1k: configs/effnet_b0.py's recipe at 240 px, dropout 0.2.

Command (data options as for B0): python train.py --config configs/effnet_b1.py --workdir DIR

Expected result: 79.1% top-1 from the EMA weights (Tan & Le 2019, Table 2, AutoAugment).
Time: not measured (no accelerator); B0's 109,200 steps at B1's MACs (tools/model_table.py).
"""

from configs import effnet_b0


def get_config():
    return effnet_b0.scaled(1, resolution=240, drop_rate=0.2)
