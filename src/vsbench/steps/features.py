raise NotImplementedError("step not written yet")
