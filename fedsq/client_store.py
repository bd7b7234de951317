"""Per-client state on disk (SCAFFOLD's control variates, FedBN's BatchNorm layers), so that
memory does not grow with the number of clients."""

from __future__ import annotations

from pathlib import Path

import torch

from fedsq.files import write_atomic


class ClientStore:
    """Per-client tensors on disk, one file per client and round.

    A client's state is read as "the latest version written before round r", so redoing an
    interrupted round (resume) reads what the uninterrupted run read. Old versions go only
    once a checkpoint makes them unreadable (``prune``): training may run rounds ahead of the
    checkpoint on disk, and a version its resume still needs must outlive those rounds.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def _versions(self, client: int) -> list[int]:
        folder = self.root / f"client{client}"
        if not folder.is_dir():
            return []
        return sorted(int(f.stem.removeprefix("round")) for f in folder.glob("round*.pt"))

    def get(self, client: int, before_round: int, device: torch.device | str = "cpu") -> dict | None:
        earlier = [v for v in self._versions(client) if v < before_round]
        if not earlier:
            return None
        path = self.root / f"client{client}" / f"round{earlier[-1]}.pt"
        return torch.load(path, map_location=device, weights_only=True)

    def put(self, client: int, round: int, state: dict[str, torch.Tensor]) -> None:
        folder = self.root / f"client{client}"
        folder.mkdir(parents=True, exist_ok=True)
        cpu_state = {k: v.detach().cpu() for k, v in state.items()}
        write_atomic(folder / f"round{round}.pt", lambda tmp: torch.save(cpu_state, tmp))

    def prune(self, checkpointed_round: int) -> None:
        """Delete the versions a run resumed after ``checkpointed_round`` can no longer read:
        per client, all but the newest up to that round (later ones are kept)."""
        for folder in self.root.glob("client*"):
            client = int(folder.name.removeprefix("client"))
            readable = [v for v in self._versions(client) if v <= checkpointed_round]
            for stale in readable[:-1]:
                (folder / f"round{stale}.pt").unlink()
