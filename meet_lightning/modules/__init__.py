"""LightningModules: the shared base, MEET's two stages, and the baselines."""

from meet_lightning.modules.base import MeetModule
from meet_lightning.modules.baselines import DPOModule, HybridDPOModule, SFTModule
from meet_lightning.modules.stage1 import ControlTokenModule
from meet_lightning.modules.stage2 import JointFinetuneModule

__all__ = ["MeetModule", "ControlTokenModule", "JointFinetuneModule", "SFTModule", "DPOModule", "HybridDPOModule"]
