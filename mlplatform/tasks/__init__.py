"""Learning tasks (binary, multiclass, regression): what each measures, plots and answers."""
