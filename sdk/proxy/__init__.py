"""The proxy policy (Proxy-RLHF): a small network that accepts or rejects the LLM's tokens.

Policy, stable proxy sampling, rewards, a background trajectory logger that survives outages, a
follower of the service's proxy registry, and Parquet export for offline trainers.
"""

from .export import episodes_from_parquet, export_parquet, write_parquet
from .logger import TrajectoryLogger
from .policy import ProxyConfig, ProxyPolicy
from .reward import Reward, score_episodes
from .sampling import make_episodes, make_proxy_chooser, sample_with_proxy
from .updates import ProxyUpdater

__all__ = [
    "ProxyConfig", "ProxyPolicy", "ProxyUpdater", "Reward", "TrajectoryLogger", "episodes_from_parquet",
    "export_parquet", "make_episodes", "make_proxy_chooser", "sample_with_proxy", "score_episodes", "write_parquet",
]
