"""The course around the labs: predictions sheets, scoring against the kernel, grading, HTML reports.

Data flows one way: a lab's scenarios and expectation template give the
questions (``sheet``), a check's kernel run gives the answers (``score``),
and ``grade`` puts every student's sheet, own scenario and written answers
together. Nothing here boots or reaches a VM: the tasks hand in the check.
"""
