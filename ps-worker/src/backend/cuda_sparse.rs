//! The CUDA backend's sparse ops (`kernels/sparse.cu`): pooled gathers of
//! pulled rows and their scatter back (chunked per row, the chunks of hot
//! rows reduced in a second pass), and the FM terms. The
//! [`Backend`] impl in `cuda.rs` calls these.

use cudarc::driver::PushKernelArg;

use super::{
    Backend, BackendError, CudaBackend, CudaPlan, CudaTensor, Pooling, check_plan_rows,
    device_error, int, linear, shape_error,
};

impl CudaBackend {
    /// Writes the rows with several chunks: the sum of their partials, in
    /// chunk order.
    pub(super) fn reduce_chunks(
        &self,
        out: &mut CudaTensor,
        partial: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(), BackendError> {
        if plan.multi_chunk_rows == 0 {
            return Ok(());
        }
        let (count, dim) = (
            int(plan.multi_chunk_rows, "scatter")?,
            int(partial.cols, "scatter")?,
        );
        let mut b = self.stream.launch_builder(&self.k.reduce_chunks);
        b.arg(&mut out.buf)
            .arg(&partial.buf)
            .arg(&plan.row_chunks)
            .arg(&plan.multi_rows);
        b.arg(&count).arg(&dim);
        // SAFETY: multi_rows holds `count` row ids < unique; row_chunks indexes
        // partial's rows.
        unsafe { b.launch(linear(plan.multi_chunk_rows * partial.cols)) }.map_err(device_error)?;
        Ok(())
    }

    pub(super) fn check_plan_rows(
        &self,
        op: &'static str,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(), BackendError> {
        check_plan_rows(op, rows.rows, plan.unique)
    }

    pub(super) fn gather_pool_op(
        &self,
        rows: &CudaTensor,
        plan: &CudaPlan,
        pooling: Pooling,
    ) -> Result<CudaTensor, BackendError> {
        self.check_plan_rows("gather_pool", rows, plan)?;
        let (out_rows, stride) = pooled_rows(plan, pooling);
        if out_rows * rows.cols == 0 {
            return self.zeros(out_rows, rows.cols);
        }
        let mut out = self.uninit(out_rows, rows.cols)?;
        let (n, dim, stride) = (
            int(out_rows, "gather_pool")?,
            int(rows.cols, "gather_pool")?,
            int(stride, "gather_pool")?,
        );
        // float4 loads when rows are whole multiples of 16 bytes.
        let (kernel, lanes) = if rows.cols.is_multiple_of(4) {
            (&self.k.gather_pool4, rows.cols / 4)
        } else {
            (&self.k.gather_pool, rows.cols)
        };
        let mut b = self.stream.launch_builder(kernel);
        b.arg(&mut out.buf)
            .arg(&rows.buf)
            .arg(&plan.entry_row)
            .arg(&plan.entry_value);
        b.arg(&plan.segment_offsets).arg(&n).arg(&dim).arg(&stride);
        // SAFETY: the kernel reads `segment_offsets[0..=n*stride]` and the rows
        // they index, all sized by the plan, and writes `out[0..n*dim]`;
        // device allocations are 256-byte aligned, so float4 rows are aligned.
        unsafe { b.launch(linear(out_rows * lanes)) }.map_err(device_error)?;
        Ok(out)
    }

    pub(super) fn scatter_pool_op(
        &self,
        grad: &CudaTensor,
        plan: &CudaPlan,
        pooling: Pooling,
    ) -> Result<CudaTensor, BackendError> {
        let (out_rows, stride) = pooled_rows(plan, pooling);
        if grad.rows != out_rows {
            return Err(shape_error(
                "scatter_pool",
                format!("{} gradient rows, expected {out_rows}", grad.rows),
            ));
        }
        if plan.unique * grad.cols == 0 || plan.chunks == 0 {
            return self.zeros(plan.unique, grad.cols);
        }
        // Every row is written: by its one chunk, or by the reduction.
        let mut out = self.uninit(plan.unique, grad.cols)?;
        let mut partial = self.uninit(plan.chunks, grad.cols)?;
        let (chunks, dim, stride) = (
            int(plan.chunks, "scatter_pool")?,
            int(grad.cols, "scatter_pool")?,
            int(stride, "scatter_pool")?,
        );
        let (kernel, lanes) = if grad.cols.is_multiple_of(4) {
            (&self.k.scatter_chunks4, grad.cols / 4)
        } else {
            (&self.k.scatter_chunks, grad.cols)
        };
        let mut b = self.stream.launch_builder(kernel);
        b.arg(&mut out.buf)
            .arg(&mut partial.buf)
            .arg(&grad.buf)
            .arg(&plan.chunk_offsets);
        b.arg(&plan.chunk_row)
            .arg(&plan.row_chunks)
            .arg(&plan.row_entry_segment);
        b.arg(&plan.row_entry_value)
            .arg(&chunks)
            .arg(&dim)
            .arg(&stride);
        // SAFETY: reads the plan's index arrays and `grad[0..out_rows*dim]`,
        // writes rows of `out` ([unique, dim]) and `partial` ([chunks, dim]).
        unsafe { b.launch(linear(plan.chunks * lanes)) }.map_err(device_error)?;
        self.reduce_chunks(&mut out, &partial, plan)?;
        Ok(out)
    }

    pub(super) fn fm_forward_op(
        &self,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.check_plan_rows("fm_forward", rows, plan)?;
        let mut out = self.zeros(plan.examples, 1)?;
        let (terms, sums) = self.fm_pairs(rows, plan)?;
        if sums.len() == 0 {
            return Ok((out, sums));
        }
        let (n, dim) = (int(plan.examples, "fm")?, int(rows.cols, "fm")?);
        let mut b = self.stream.launch_builder(&self.k.fm_reduce);
        b.arg(&mut out.buf).arg(&terms.buf).arg(&n).arg(&dim);
        // SAFETY: reads terms[0..n*dim], writes out[0..n].
        unsafe { b.launch(linear(plan.examples)) }.map_err(device_error)?;
        Ok((out, sums))
    }

    pub(super) fn fm_pairs_op(
        &self,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.check_plan_rows("fm_pairs", rows, plan)?;
        let mut sums = self.zeros(plan.examples, rows.cols)?;
        let mut terms = self.zeros(plan.examples, rows.cols)?;
        if sums.len() == 0 {
            return Ok((terms, sums));
        }
        let (n, dim, fields) = (
            int(plan.examples, "fm")?,
            int(rows.cols, "fm")?,
            int(plan.fields, "fm")?,
        );
        let mut b = self.stream.launch_builder(&self.k.fm_sums);
        b.arg(&mut sums.buf)
            .arg(&mut terms.buf)
            .arg(&rows.buf)
            .arg(&plan.entry_row);
        b.arg(&plan.entry_value)
            .arg(&plan.segment_offsets)
            .arg(&n)
            .arg(&dim)
            .arg(&fields);
        // SAFETY: as gather_pool with per-example pooling; writes [n, dim] twice.
        unsafe { b.launch(linear(sums.rows * sums.cols)) }.map_err(device_error)?;
        Ok((terms, sums))
    }

    pub(super) fn fm_backward_op(
        &self,
        grad: &CudaTensor,
        sums: &CudaTensor,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<CudaTensor, BackendError> {
        self.check_plan_rows("fm_backward", rows, plan)?;
        if grad.rows != plan.examples
            || !(grad.cols == 1 || grad.cols == rows.cols)
            || (sums.rows, sums.cols) != (plan.examples, rows.cols)
        {
            return Err(shape_error(
                "fm_backward",
                format!(
                    "grad [{}, {}], sums [{}, {}] for {} examples",
                    grad.rows, grad.cols, sums.rows, sums.cols, plan.examples
                ),
            ));
        }
        if plan.unique * rows.cols == 0 || plan.chunks == 0 {
            return self.zeros(plan.unique, rows.cols);
        }
        let mut out = self.uninit(plan.unique, rows.cols)?;
        let mut partial = self.uninit(plan.chunks, rows.cols)?;
        let (chunks, dim, fields, grad_cols) = (
            int(plan.chunks, "fm")?,
            int(rows.cols, "fm")?,
            int(plan.fields, "fm")?,
            int(grad.cols, "fm")?,
        );
        let mut b = self.stream.launch_builder(&self.k.fm_backward_chunks);
        b.arg(&mut out.buf)
            .arg(&mut partial.buf)
            .arg(&grad.buf)
            .arg(&sums.buf)
            .arg(&rows.buf);
        b.arg(&plan.chunk_offsets)
            .arg(&plan.chunk_row)
            .arg(&plan.row_chunks);
        b.arg(&plan.row_entry_segment).arg(&plan.row_entry_value);
        b.arg(&chunks).arg(&dim).arg(&fields).arg(&grad_cols);
        // SAFETY: reads the plan and the [examples, 1 or dim] / [examples,
        // dim] / [unique, dim] operands checked above, writes rows of out
        // and partial.
        unsafe { b.launch(linear(plan.chunks * rows.cols)) }.map_err(device_error)?;
        self.reduce_chunks(&mut out, &partial, plan)?;
        Ok(out)
    }
}

fn pooled_rows(plan: &CudaPlan, pooling: Pooling) -> (usize, usize) {
    match pooling {
        Pooling::Example => (plan.examples, plan.fields),
        Pooling::Field => (plan.examples * plan.fields, 1),
    }
}
