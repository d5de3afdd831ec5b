"""The run wing: evaluates what the build wing made (the plan, the recorded network, the deployment form), and the stages and command that report on it (reference, verify, bench, report, detect)."""
