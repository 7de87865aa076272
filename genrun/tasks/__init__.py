"""Task plug-ins. Each module is one task family; configs in conf/task/ pick a class by `_target_`."""

from genrun.tasks.base import ClassificationTask, Task

__all__ = ["ClassificationTask", "Task"]
