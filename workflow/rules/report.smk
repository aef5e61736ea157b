# Tables, figures and the HTML report, from the result files of every stage.


def final_outputs():
    return policy_files() + eval_files("ppl") + eval_files("harness") + eval_files("longctx") + distance_files()
