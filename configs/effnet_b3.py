"""EfficientNet-B3 on ImageNet-1k: configs/effnet_b0.py's recipe at 300 px, dropout 0.3.

Command (data options as for B0): python train.py --config configs/effnet_b3.py --workdir DIR

Expected result: 81.6% top-1 from the EMA weights (Tan & Le 2019, Table 2, AutoAugment).
Time: not measured (no accelerator); B0's 109,200 steps at B3's MACs (tools/model_table.py).
"""

from configs import effnet_b0


def get_config():
    return effnet_b0.scaled(3, resolution=300, drop_rate=0.3)
