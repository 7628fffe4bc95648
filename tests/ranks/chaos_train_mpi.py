"""`cke-dist train ...` with one rank SIGKILLing itself at a chosen point; tests/cluster/test_chaos.py runs it.

    CKE_CHAOS=allreduce:1:3 python tests/ranks/chaos_train_mpi.py --no-progress --set ...   # as `cke-dist train`

CKE_CHAOS = POINT:RANK:SKIP. Once the run directory holds a complete checkpoint (so a resume has something to
start from), rank RANK lets SKIP occurrences of POINT pass and dies (SIGKILL, no clean-up of any kind) at the
next one:
- allreduce:  inside an allreduce (a dp bucket, a tp activation-gradient sum, the grad norm), after its first
              message went out, so its peers are in the middle of the op;
- backward:   inside a backward pass (the MLP of the last layer, after the LM head's gradient);
- checkpoint: while writing its checkpoint shard: the weights file is left half written.
Before dying it writes "<unix time> <what>" to $CKE_CHAOS_MARK, so the test can time the others' exit.
The hooks wrap functions of the real job; nothing else changes.
"""
import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

import cke_dist.comm.collectives as collectives
import cke_dist.model.llama as llama
from cke_dist.comm.slots import SlotLink
from cke_dist.comm.tcp import TcpLink


def _out_dir(argv):
    for i, a in enumerate(argv):
        if argv[i - 1] == "--set" and a.startswith("train.out_dir="):
            return Path(a.split("=", 1)[1])
    raise SystemExit("chaos_job: pass --set train.out_dir=DIR")


class Trigger:
    def __init__(self, point, skip, out_dir):
        self.point, self.skip, self.ckpts = point, skip, out_dir / "checkpoints"
        self.armed = False

    def hit(self) -> bool:
        if not self.armed:
            self.armed = self.ckpts.is_dir() and any(p.name.startswith("step_") for p in self.ckpts.iterdir())
            if not self.armed:
                return False
        if self.skip > 0:
            self.skip -= 1
            return False
        return True


def die(what):
    line = f"{time.time():.6f} {what}"
    sys.stderr.write(f"chaos: rank {os.environ.get('PMI_RANK')} SIGKILLs itself {what}\n")
    sys.stderr.flush()
    Path(os.environ["CKE_CHAOS_MARK"]).write_text(line + "\n")
    os.kill(os.getpid(), signal.SIGKILL)


def install(point, skip, out_dir):
    trig = Trigger(point, skip, out_dir)
    if point == "allreduce":
        inside = []
        orig_allreduce = collectives.allreduce

        def allreduce(ctx, flat, op, tag):
            if trig.hit():
                inside.append(f"mid-allreduce of {flat.nbytes} bytes on {ctx.name} (after its first message)")
            return orig_allreduce(ctx, flat, op, tag)
        collectives.allreduce = allreduce
        for cls in (TcpLink, SlotLink):
            def send(self, buf, tag, deadline, _orig=cls.send):
                _orig(self, buf, tag, deadline)
                if inside:
                    die(inside[0])
            cls.send = send
    elif point == "backward":
        orig_swiglu = llama.swiglu_backward

        def swiglu_backward(*args, **kw):
            if trig.hit():
                die("mid-backward (the last layer's MLP)")
            return orig_swiglu(*args, **kw)
        llama.swiglu_backward = swiglu_backward
    elif point == "checkpoint":
        import cke_dist.formats.checkpoint as ckpt   # its shards go through the name it imported
        orig_save = ckpt.write_safetensors

        def write_safetensors(tensors, filename, *args, **kw):
            orig_save(tensors, filename, *args, **kw)
            if trig.hit():
                size = os.path.getsize(filename)
                with open(filename, "r+b") as f:
                    f.truncate(size // 2)
                die(f"mid-checkpoint-write ({Path(filename).name} left at {size // 2} of {size} bytes)")
        ckpt.write_safetensors = write_safetensors
    else:
        raise SystemExit(f"chaos_job: unknown point {point!r}: use allreduce, backward or checkpoint")


def main(argv):
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # a test that finds a rank hanging dumps its stacks
    spec = os.environ.get("CKE_CHAOS")
    if spec:
        point, rank, skip = spec.split(":")
        if os.environ.get("PMI_RANK") == rank:
            install(point, int(skip), _out_dir(argv))
    from cke_dist.cli import main as cli_main
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
