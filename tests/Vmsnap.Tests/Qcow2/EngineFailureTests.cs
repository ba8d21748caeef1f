using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Qcow2.Snapshots;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// What the engine leaves behind when the device fails: no request stays registered in flight (so
/// nothing waits forever afterwards), the error reported is the first one, and the VM-state area
/// never lets a flush run under a data write it issued.
/// </summary>
[Trait("Category", "Unit")]
public sealed class EngineFailureTests
{
    private static MemoryBlockDevice NewImage(long size = 16 << 20, int clusterSize = 4096)
    {
        var device = new MemoryBlockDevice();
        Qcow2Image.Create(device, "img", size, new Qcow2CreateOptions { ClusterSize = clusterSize }).Dispose();
        return device;
    }

    private static void AssertCompletes(Action action, string what)
    {
        var task = Task.Run(action);
        Assert.True(task.Wait(TimeSpan.FromSeconds(30)), $"{what} did not return: a failed request is still registered in flight");
    }

    [Fact]
    public void A_failed_data_write_whose_device_keeps_failing_releases_its_registration_and_does_no_cleanup_io()
    {
        var device = new CountingDevice(NewImage());
        using var img = Qcow2Image.Open(device, "img");
        img.Write(new byte[4096], 0);
        // The next write allocates an L2 table and a cluster (refcounts dirty), then its data write fails,
        // and so does every later write and flush until the device recovers.
        int failAt = device.Writes;
        int flushes = device.Flushes;
        device.FailAt = failAt;
        device.FailAfter = true;
        var e = Assert.Throws<StorageException>(() => img.Write(new byte[100], 5 << 20));
        Assert.Equal($"injected failure of write {failAt}", e.Message);
        Assert.Equal(failAt + 1, device.Writes);      // no I/O after the failure...
        Assert.Equal(flushes, device.Flushes);        // ...not even a flush

        device.FailAfter = false;                     // the device recovers
        device.FailAt = int.MaxValue;
        AssertCompletes(() => Assert.True(img.Check().IsClean), "Check()");
        AssertCompletes(() => img.Write([1, 2, 3], 5 << 20), "an overlapping write");
        AssertCompletes(() => img.CreateSnapshot("after"), "a snapshot create");
        AssertCompletes(() => img.OpenVmStateAreaForWriting().Dispose(), "OpenVmStateAreaForWriting");
        byte[] back = new byte[3];
        img.Read(back, 5 << 20);
        Assert.Equal(new byte[] { 1, 2, 3 }, back);
        Assert.True(img.Check().IsClean);
    }

    [Fact]
    public void A_failed_copy_on_write_with_a_dying_device_releases_its_registration()
    {
        var device = new CountingDevice(NewImage());
        using var img = Qcow2Image.Open(device, "img");
        img.Write(Enumerable.Repeat((byte)0x11, 8192).ToArray(), 0);
        img.CreateSnapshot("s");
        device.FailAt = device.Writes;
        device.FailAfter = true;
        Assert.Throws<StorageException>(() => img.Write([9], 100));   // a merged copy of a shared cluster
        device.FailAfter = false;
        device.FailAt = int.MaxValue;
        AssertCompletes(() => img.Write([7], 100), "the same write again");
        byte[] b = new byte[4096];
        img.Read(b, 0);
        Assert.Equal(7, b[100]);
        Assert.All(b.Where((_, i) => i != 100), x => Assert.Equal(0x11, x));
        Qcow2CheckResult r = img.Check();
        Assert.True(r.IsClean, string.Join("\n", r.Messages));
    }

    [Fact]
    public void Dispose_after_a_failure_reports_the_first_error_not_its_own_flush_failure()
    {
        var device = new CountingDevice(NewImage());
        string? reported = null;
        int failAt = -1;
        try
        {
            using var img = Qcow2Image.Open(device, "img");
            img.Write(new byte[4096], 1 << 20);   // metadata left dirty
            failAt = device.Writes;
            device.FailAt = failAt;
            device.FailAfter = true;              // the disk died: Dispose's flush fails too
            img.Flush();
        }
        catch (StorageException e)
        {
            reported = e.Message;
        }
        Assert.Equal($"injected failure of write {failAt}", reported);
    }

    [Fact]
    public void Dispose_reports_its_flush_failure_when_it_is_the_first_error()
    {
        var device = new CountingDevice(NewImage());
        var img = Qcow2Image.Open(device, "img");
        img.Write(new byte[4096], 1 << 20);
        device.FailAt = device.Writes;
        device.FailAfter = true;
        var e = Assert.Throws<StorageException>(img.Dispose);
        Assert.Contains("injected failure", e.Message);
        img.Dispose();   // disposed already: nothing more
    }

    /// <summary>
    /// A device whose asynchronous writes wait at a gate, and whose asynchronous write throws at once
    /// when its token is cancelled (as <see cref="FileBlockDevice"/> does); the first gated write
    /// cancels the token, as a Ctrl-C arriving mid-request would. Records a flush made while a
    /// write was still pending.
    /// </summary>
    private sealed class GatedDevice(IBlockDevice inner) : IBlockDevice
    {
        private readonly TaskCompletionSource _gate = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private int _pending;

        public CancellationTokenSource? CancelOnFirstGatedWrite { get; set; }
        public bool Gating { get; set; }
        public bool FlushedWhileWriting { get; private set; }
        public long Length => inner.Length;
        public bool IsReadOnly => false;
        public int Alignment => 1;

        public void Open() => _gate.TrySetResult();

        public int Read(Span<byte> buffer, long offset) => inner.Read(buffer, offset);
        public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken ct = default) => inner.ReadAsync(buffer, offset, ct);
        public void Write(ReadOnlySpan<byte> buffer, long offset) => inner.Write(buffer, offset);

        public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken ct = default)
        {
            ct.ThrowIfCancellationRequested();
            if (!Gating) return inner.WriteAsync(buffer, offset, ct);
            Interlocked.Increment(ref _pending);
            CancelOnFirstGatedWrite?.Cancel();
            CancelOnFirstGatedWrite = null;
            return new ValueTask(Task.Run(async () =>
            {
                await _gate.Task.ConfigureAwait(false);
                inner.Write(buffer.Span, offset);
                Interlocked.Decrement(ref _pending);
            }, CancellationToken.None));
        }

        public void Flush()
        {
            if (Volatile.Read(ref _pending) > 0) FlushedWhileWriting = true;
            inner.Flush();
        }

        public void SetLength(long length) => inner.SetLength(length);
        public void Discard(long offset, long length) => inner.Discard(offset, length);
        public void Dispose() => inner.Dispose();
    }

    [Fact]
    public async Task A_vm_state_write_cut_by_a_cancellation_after_its_first_segment_keeps_flush_waiting_for_that_segment()
    {
        var device = new GatedDevice(NewImage());
        using var img = Qcow2Image.Open(device, "img");
        using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
        byte[] cluster = Enumerable.Repeat((byte)0x5a, 4096).ToArray();
        area.Write(cluster, 4096);   // area cluster 1 first: a write of clusters 0..1 then maps to two separate host runs

        using var cts = new CancellationTokenSource();
        device.CancelOnFirstGatedWrite = cts;
        device.Gating = true;
        Task write = area.WriteAsync(new byte[8192], 0, cts.Token).AsTask();
        // The first segment is at the gate now (WriteAsync issued it before returning). The flush runs on a thread of
        // its own, so the gate opens once that thread has either finished (it did not wait for the segment: the
        // assertion below fails) or blocks (waiting for the segment, as it must), not after a guessed time.
        Exception? flushError = null;
        var flush = new Thread(() =>
        {
            try { area.Flush(); } catch (Exception e) { flushError = e; }
        });
        flush.Start();
        Assert.True(SpinWait.SpinUntil(() => !flush.IsAlive || flush.ThreadState.HasFlag(ThreadState.WaitSleepJoin), TimeSpan.FromSeconds(30)),
            "the flush neither finished nor waited");
        device.Open();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => write);
        Assert.True(flush.Join(TimeSpan.FromSeconds(30)), "the flush did not finish once the segment completed");
        Assert.Null(flushError);
        Assert.False(device.FlushedWhileWriting, "the area's flush ran while a data write it had issued was still in flight");
    }
}
