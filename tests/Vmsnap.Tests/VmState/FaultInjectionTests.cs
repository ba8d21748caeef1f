using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>
/// A failure at every write k: the error sticks (the same exception instance), no write follows it,
/// Close reports it, and no buffer or may-free owner is left behind. Each case runs against the
/// in-memory backend and against a qcow2 image's VM-state area (whose image must then still flush,
/// discard and check clean without waiting forever on a write in flight).
/// </summary>
[Collection(NativeMemoryCollection.Name)]
[Trait("Category", "Unit")]
public sealed class FaultInjectionTests
{
    private const int Seed = 4242;
    private const int BufferSize = 4096, BufferCount = 3;

    public enum Fault { Eio, Enospc, ShortWrite }

    public enum Target { Memory, Qcow2Area }

    /// <summary>Where the writer's bytes go: the in-memory backend or a qcow2 VM-state area (4 KiB clusters, in memory).</summary>
    private sealed class Sink : IDisposable
    {
        private readonly MemoryVmStateBackend? _memory;
        private readonly Qcow2Image? _image;
        private readonly Qcow2VmStateArea? _area;

        public Sink(Target target)
        {
            if (target == Target.Memory)
            {
                _memory = new MemoryVmStateBackend();
                Backend = _memory;
                return;
            }
            _image = Qcow2Image.Create(new MemoryBlockDevice(), "fault-injection", 1 << 20, new Qcow2CreateOptions { ClusterSize = 4096 });
            _area = _image.OpenVmStateAreaForWriting();
            Backend = VmStateBackend.ForBlockDevice(_area);
        }

        public VmStateBackend Backend { get; }

        public long Length => _memory?.Length ?? _area!.Length;

        public byte[] Contents()
        {
            if (_memory is not null) return _memory.ToArray();
            byte[] bytes = new byte[_area!.Length];
            _area.Read(bytes, 0);
            return bytes;
        }

        /// <summary>The image after the writer is gone: flush, discard everything and check, each within a time limit.</summary>
        public void AssertImageUsable()
        {
            if (_image is null) return;
            var done = Task.Run(() =>
            {
                _area!.Flush();
                _area.Discard(0, _area.Length);
                Qcow2CheckResult r = _image.Check();
                Assert.True(r.IsClean, string.Join("\n", r.Messages));
            });
            Assert.True(done.Wait(TimeSpan.FromSeconds(30)), "the image still waits for a VM-state write in flight");
            done.GetAwaiter().GetResult();
        }

        public void Dispose()
        {
            _area?.Dispose();
            _image?.Dispose();
        }
    }

    private static VmStateWriterOptions Options(VmStateWriteMode mode) =>
        new() { Mode = mode, BufferCount = BufferCount, BufferSize = BufferSize };

    /// <summary>How many writes the script makes when nothing fails.</summary>
    private static int CleanWrites(VmStateWriteMode mode)
    {
        using var backend = new FaultInjectingBackend(new MemoryVmStateBackend());
        using var writer = new VmStateWriter(backend, Options(mode));
        WriterScript.Run(writer, WriterScript.Generate(Seed, maxOps: 60, maxLarge: 20000), checkTell: false);
        writer.Close();
        return backend.Writes.Count;
    }

    [Theory]
    [InlineData(VmStateWriteMode.Gather, Fault.Eio, Target.Memory)]
    [InlineData(VmStateWriteMode.Gather, Fault.Enospc, Target.Memory)]
    [InlineData(VmStateWriteMode.Gather, Fault.ShortWrite, Target.Memory)]
    [InlineData(VmStateWriteMode.Buffered, Fault.Eio, Target.Memory)]
    [InlineData(VmStateWriteMode.Buffered, Fault.Enospc, Target.Memory)]
    [InlineData(VmStateWriteMode.Gather, Fault.Eio, Target.Qcow2Area)]
    [InlineData(VmStateWriteMode.Gather, Fault.ShortWrite, Target.Qcow2Area)]
    [InlineData(VmStateWriteMode.Buffered, Fault.Eio, Target.Qcow2Area)]
    [InlineData(VmStateWriteMode.Buffered, Fault.Enospc, Target.Qcow2Area)]
    public void A_failure_thrown_by_write_k_is_the_last_write_and_Close_reports_it(VmStateWriteMode mode, Fault fault, Target target)
    {
        int clean = CleanWrites(mode);
        Assert.True(clean >= 6, $"the script makes only {clean} writes");
        for (int k = 1; k <= clean; k++)
        {
            long live = AlignedBuffer.LiveCount;
            using var sink = new Sink(target);
            var backend = new FaultInjectingBackend(sink.Backend, k)
            {
                FailAtWrite = fault == Fault.ShortWrite ? 0 : k,
                ShortWriteAt = fault == Fault.ShortWrite ? k : 0,
                FailureErrno = fault == Fault.Enospc ? FaultInjectingBackend.ENOSPC : FaultInjectingBackend.EIO,
            };
            List<TrackedOwner> owners;
            using (var writer = new VmStateWriter(backend, Options(mode)))
            {
                owners = WriterScript.Run(writer, WriterScript.Generate(Seed, maxOps: 60, maxLarge: 20000), checkTell: false);
                if (k < clean)
                {
                    Assert.Same(backend.InjectedError, writer.Error);
                    AssertLaterCallsAreNoOps(writer);
                }
                else
                {
                    Assert.Null(writer.Error);                  // the last write is the tail, written by Close
                }

                var e = Assert.Throws<VmStateException>(writer.Close);
                Assert.Same(backend.InjectedError, e.InnerException);
                Assert.Contains($"stream offset {backend.Writes[k - 1].Position}", e.Message);
                if (fault != Fault.ShortWrite)
                    Assert.Equal(fault == Fault.Enospc ? FaultInjectingBackend.ENOSPC : FaultInjectingBackend.EIO, ((StorageException)e.InnerException!).ErrorCode);
                // Close again repeats the report.
                Assert.Same(backend.InjectedError, Assert.Throws<VmStateException>(writer.Close).InnerException);
            }
            Assert.Equal(k, backend.Writes.Count);
            Assert.Equal(0, backend.CallsAfterFailure);
            Assert.Equal(0, backend.Flushes);                  // no sync of a broken stream
            Assert.Equal(live, AlignedBuffer.LiveCount);
            Assert.All(owners, o => Assert.Equal(1, o.DisposeCount));
            // What was written before the failure is the stream's true prefix.
            byte[] expected = WriterScript.Reference(WriterScript.Generate(Seed, maxOps: 60, maxLarge: 20000));
            long prefix = backend.Writes[k - 1].Position;
            Assert.Equal(expected.AsSpan(0, (int)prefix).ToArray(), sink.Contents().AsSpan(0, (int)prefix).ToArray());
            sink.AssertImageUsable();
        }
    }

    [Theory]
    [InlineData(Fault.Eio, Target.Memory)]
    [InlineData(Fault.Enospc, Target.Memory)]
    [InlineData(Fault.ShortWrite, Target.Memory)]
    [InlineData(Fault.Eio, Target.Qcow2Area)]
    [InlineData(Fault.ShortWrite, Target.Qcow2Area)]
    public void A_failure_of_asynchronous_write_k_stops_all_later_writes_and_Close_reports_it(Fault fault, Target target)
    {
        int clean = CleanWrites(VmStateWriteMode.Buffered);
        for (int k = 1; k <= clean; k++)
        {
            long live = AlignedBuffer.LiveCount;
            using var sink = new Sink(target);
            var backend = new FaultInjectingBackend(sink.Backend, k)
            {
                FailAtWrite = fault == Fault.ShortWrite ? 0 : k,
                ShortWriteAt = fault == Fault.ShortWrite ? k : 0,
                FailAsynchronously = true,
                FailureErrno = fault == Fault.Enospc ? FaultInjectingBackend.ENOSPC : FaultInjectingBackend.EIO,
                MaxJitterMilliseconds = 2,
            };
            List<TrackedOwner> owners;
            using (var writer = new VmStateWriter(backend, Options(VmStateWriteMode.Buffered)))
            {
                backend.IssueGuard = () => writer.Error is not null;
                owners = WriterScript.Run(writer, WriterScript.Generate(Seed, maxOps: 60, maxLarge: 20000), checkTell: false);
                if (writer.Error is not null) AssertLaterCallsAreNoOps(writer, writesInFlight: true);
                var e = Assert.Throws<VmStateException>(writer.Close);
                Assert.Same(backend.InjectedError, e.InnerException);
                Assert.Same(backend.InjectedError, writer.Error);
                Assert.Contains($"stream offset {backend.Writes[k - 1].Position}", e.Message);
            }
            // Writes issued before the failure completed may still land; none is issued once the writer knows.
            Assert.Equal(0, backend.GuardViolations);
            Assert.Equal(0, backend.Flushes);
            Assert.Equal(live, AlignedBuffer.LiveCount);
            Assert.All(owners, o => Assert.Equal(1, o.DisposeCount));
            sink.AssertImageUsable();
        }
    }

    [Theory]
    [InlineData(VmStateWriteMode.Gather, Target.Memory)]
    [InlineData(VmStateWriteMode.Buffered, Target.Memory)]
    [InlineData(VmStateWriteMode.Gather, Target.Qcow2Area)]
    [InlineData(VmStateWriteMode.Buffered, Target.Qcow2Area)]
    public void A_failing_final_sync_is_reported_by_Close(VmStateWriteMode mode, Target target)
    {
        long live = AlignedBuffer.LiveCount;
        using var sink = new Sink(target);
        var backend = new FaultInjectingBackend(sink.Backend) { FailFlush = true };
        using (var writer = new VmStateWriter(backend, Options(mode)))
        {
            writer.PutBuffer(new byte[10000]);
            var e = Assert.Throws<VmStateException>(writer.Close);
            Assert.Same(backend.InjectedError, e.InnerException);
            Assert.Equal(1, backend.Flushes);
        }
        Assert.Equal(live, AlignedBuffer.LiveCount);
        sink.AssertImageUsable();
    }

    [Theory]
    [InlineData(Target.Memory)]
    [InlineData(Target.Qcow2Area)]
    public void Dispose_without_Close_waits_for_writes_in_flight_and_frees_everything(Target target)
    {
        long live = AlignedBuffer.LiveCount;
        using var sink = new Sink(target);
        var backend = new FaultInjectingBackend(sink.Backend) { Latency = TimeSpan.FromMilliseconds(20) };
        List<TrackedOwner> owners;
        using (var writer = new VmStateWriter(backend, Options(VmStateWriteMode.Buffered)))
        {
            owners = WriterScript.Run(writer, WriterScript.Generate(Seed, maxOps: 60, maxLarge: 20000), checkTell: false);
        }
        // Every write issued completed before the buffers went: the backend holds whole buffers only.
        Assert.Equal(backend.Writes.Count, backend.CompletionOrder.Count);
        Assert.Equal(0, sink.Length % BufferSize);
        Assert.Equal(live, AlignedBuffer.LiveCount);
        Assert.All(owners, o => Assert.Equal(1, o.DisposeCount));
        Assert.Equal(0, backend.Flushes);
        sink.AssertImageUsable();
    }

    [Fact]
    public void A_channel_refuses_a_write_out_of_sequence()
    {
        using var backend = VmStateBackend.ForStream(new MemoryStream());
        backend.WriteVectored([new byte[10]], 0);
        var e = Assert.Throws<VmStateException>(() => backend.WriteVectored([new byte[10]], 20));
        Assert.Contains("offset 20", e.Message);
    }

    private static void AssertLaterCallsAreNoOps(VmStateWriter writer, bool writesInFlight = false)
    {
        long tell = writer.Tell(), written = writer.BytesTransferred;
        Exception? error = writer.Error;
        writer.PutBe64(1);
        writer.PutBuffer(new byte[100000]);
        var owner = new TrackedOwner();
        writer.PutBufferAsync(new byte[5000], owner);
        Assert.Equal(1, owner.DisposeCount);                   // nothing will ever write it: released at once
        writer.Flush();
        Assert.Equal(tell, writer.Tell());
        // Writes issued before the failure may still complete; otherwise nothing moves.
        if (!writesInFlight) Assert.Equal(written, writer.BytesTransferred);
        Assert.Same(error, writer.Error);
    }
}
