"""Test-only patches that let Triton's interpreter run our kernels on CPU (Triton 3.9).

CPU machines have no GPU driver, so Triton kernels run only under `TRITON_INTERPRET=1`. The interpreter then
(1) asks the absent driver to benchmark autotune configs, (2) hands loops plain Python ints where compiled
Triton has tensors, and (3) multiplies the raw bits of bf16 operands in `tl.dot`. `install()` fixes all three.
It touches Triton internals, so it runs only in tests, only under the interpreter.
"""

from __future__ import annotations

import ast


def install() -> None:
    import numpy as np
    import triton.language as tl
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter

    # (1) no driver to benchmark with: the first config wins
    autotuner.Autotuner.do_bench = property(lambda self: lambda fn, quantiles=None, **kw: [0.0, 0.0, 0.0])

    # (2) loop variables of `range`/`tl.range` become tensors, as in compiled Triton
    def visit_for(self, node):
        node = self.generic_visit(node)
        it = node.iter
        is_range = isinstance(it, ast.Call) and (
            (isinstance(it.func, ast.Name) and it.func.id == "range")
            or (isinstance(it.func, ast.Attribute) and it.func.attr == "range")
        )
        if isinstance(node.target, ast.Name) and is_range:
            to_tensor = ast.Call(
                ast.Attribute(ast.Name("interpreter_semantic", ast.Load()), "to_tensor", ast.Load()),
                [ast.Name(node.target.id, ast.Load()), ast.Constant(False)],
                [],
            )
            wrap = ast.Assign(targets=[ast.Name(node.target.id, ast.Store())], value=to_tensor)
            node.body.insert(0, ast.copy_location(wrap, node))
            ast.fix_missing_locations(node)
        return node

    interpreter.ASTTransformer.visit_For = visit_for

    # (3) upcast bf16 operands of tl.dot
    create_dot = interpreter.InterpreterBuilder.create_dot

    def upcast(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    interpreter.InterpreterBuilder.create_dot = lambda self, a, b, d, p, m: create_dot(
        self, upcast(a), upcast(b), d, p, m
    )
