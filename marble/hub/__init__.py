"""Model weights for every stage: resolve, snapshot, verify, lock, offline (one layer for models and rewards).

- `artifact`: what a download is (repo, revision, file patterns);
- `resolve`: `Hub`, the run's access to weights (reward cache, local directory or hub; offline; lock);
- `snapshots`: the verified snapshot cache written by `marble cache-rewards`;
- `lock`: the model lock file (`marble lock`);
- `weights`: loading torch pickles safely, converting them to safetensors;
- `files`: listing, hashing, copying model directories (symbolic links refused).

Imports nothing from `marble.models` or `marble.rewards`: both build on it.
"""

from marble.hub.artifact import WEIGHT_PATTERNS, Artifact
from marble.hub.resolve import Hub, env_offline
from marble.hub.weights import load_state_dict_file

__all__ = ["WEIGHT_PATTERNS", "Artifact", "Hub", "env_offline", "load_state_dict_file"]
