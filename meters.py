"""Running averages of logged values, printed in the original's log format and written to
TensorBoard (`torch.utils.tensorboard`, which replaces the original `tensorboard_logger`)."""
from collections import OrderedDict


class AverageMeter:
    """The current value and the running average."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.val = 0
        self.avg = 0
        self.sum = 0
        self.count = 0

    def update(self, val, n=0):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / (.0001 + self.count)

    def __str__(self):
        if self.count == 0:  # values recorded as is, e.g. the iteration number
            return str(self.val)
        return "%.4f (%.4f)" % (self.val, self.avg)


class LogCollector:
    """A named set of meters, in the order they were first updated."""

    def __init__(self):
        self.meters = OrderedDict()

    def update(self, k, v, n=0):
        if k not in self.meters:
            self.meters[k] = AverageMeter()
        self.meters[k].update(v, n)

    def __str__(self):
        return "  ".join(k + " " + str(v) for k, v in self.meters.items())

    def tb_log(self, writer, prefix="", step=None):
        """Write every meter's current value to a SummaryWriter (None: nothing)."""
        if writer is None:
            return
        for k, v in self.meters.items():
            writer.add_scalar(prefix + k, v.val, global_step=step)
