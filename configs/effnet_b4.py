"""EfficientNet-B4 on ImageNet-1k: configs/effnet_b0.py's recipe at 380 px, dropout 0.4.

Command (data options as for B0): python train.py --config configs/effnet_b4.py --workdir DIR

Expected result: 82.9% top-1 from the EMA weights (Tan & Le 2019, Table 2, AutoAugment).
Time: not measured (no accelerator); B0's 109,200 steps at B4's MACs (tools/model_table.py).
"""

from configs import effnet_b0


def get_config():
    return effnet_b0.scaled(4, resolution=380, drop_rate=0.4)
