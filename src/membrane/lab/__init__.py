"""``membrane lab``: a multi-node cluster made of network namespaces on one machine.

:class:`~membrane.lab.lab.Lab` builds and removes labs; :mod:`membrane.lab.plan` is the address
plan; :mod:`membrane.lab.state` the lab record; :mod:`membrane.lab.registry` picks the lab a
command means; :mod:`membrane.lab.host` and :mod:`membrane.lab.fake` are the machine boundary.
"""

from membrane.lab.lab import DownReport, Lab, LabStatus, MemberStatus, Progress
from membrane.lab.state import LabDirs, LabRecord

__all__ = ["DownReport", "Lab", "LabDirs", "LabRecord", "LabStatus", "MemberStatus", "Progress"]
