using System.IO.Pipes;
using System.Net;
using System.Net.Sockets;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>Every backend carries a stream from the writer to the reader unchanged.</summary>
[Collection(NativeMemoryCollection.Name)]
[Trait("Category", "Unit")]
public sealed class BackendTests
{
    private const int Seed = 9001;

    private static List<WriterOp> Script() => WriterScript.Generate(Seed, maxOps: 80, maxLarge: 200_000);

    private static byte[] ReadAll(VmStateReader reader)
    {
        var all = new MemoryStream();
        byte[] chunk = new byte[7777];
        while (true)
        {
            int n = reader.Peek(chunk);
            if (n == 0) return all.ToArray();
            reader.Skip(n);
            all.Write(chunk, 0, n);
        }
    }

    [Theory]
    [InlineData(true, null)]
    [InlineData(true, VmStateWriteMode.Gather)]
    [InlineData(false, null)]
    public void A_file_holds_the_exact_stream_and_reads_back_through_read_ahead(bool direct, VmStateWriteMode? mode)
    {
        long live = AlignedBuffer.LiveCount;
        byte[] expected = WriterScript.Reference(Script());
        Assert.NotEqual(0, expected.Length % 4096);               // the tail is unaligned
        using var dir = new TempDir();
        string path = dir.File("vmstate.bin");
        using (var device = FileBlockDevice.Open(path, new FileBlockDeviceOptions { Create = true, Direct = direct }))
        using (var backend = VmStateBackend.ForBlockDevice(device))
        using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { Mode = mode, BufferCount = 4, BufferSize = 64 * 1024 }))
        {
            Assert.Equal(direct, device.IsDirect);
            Assert.Equal(mode ?? VmStateWriteMode.Buffered, writer.Mode);
            WriterScript.Run(writer, Script());
            writer.Close();
        }
        Assert.Equal(expected, File.ReadAllBytes(path));           // exact length: the tail is not padded
        using (var device = FileBlockDevice.Open(path, new FileBlockDeviceOptions { Direct = direct }))
        using (var backend = VmStateBackend.ForBlockDevice(device))
        using (var reader = new VmStateReader(backend, 64 * 1024))
            Assert.Equal(expected, ReadAll(reader));
        Assert.Equal(live, AlignedBuffer.LiveCount);
    }

    [Fact]
    public void A_window_of_a_device_starts_at_its_base_and_ends_reads_at_its_length()
    {
        var device = new MemoryBlockDevice(new byte[3 * 65536]);
        byte[] expected = WriterScript.Reference(WriterScript.Generate(3, maxOps: 20, maxLarge: 30000));
        using (var backend = VmStateBackend.ForBlockDevice(device, 65536, expected.Length))
        using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferSize = 8192 }))
        {
            WriterScript.Run(writer, WriterScript.Generate(3, maxOps: 20, maxLarge: 30000));
            writer.Close();
        }
        Assert.Equal(expected, device.ToArray().AsSpan(65536, expected.Length).ToArray());
        using (var backend = VmStateBackend.ForBlockDevice(device, 65536, expected.Length))
        using (var reader = new VmStateReader(backend, 8192))
            Assert.Equal(expected, ReadAll(reader));
        using (var backend = VmStateBackend.ForBlockDevice(device, 65536, 100))
        {
            var e = Assert.Throws<VmStateException>(() => backend.WriteVectored([new byte[200]], 0));
            Assert.Contains("past the end of the VM-state area", e.Message);
        }
    }

    [Fact]
    public async Task A_pipe_carries_the_stream()
    {
        byte[] expected = WriterScript.Reference(Script());
        using var server = new AnonymousPipeServerStream(PipeDirection.Out);
        using var client = new AnonymousPipeClientStream(PipeDirection.In, server.ClientSafePipeHandle);
        var write = Task.Run(() =>
        {
            using var backend = VmStateBackend.ForStream(server, leaveOpen: true);
            using var writer = new VmStateWriter(backend);
            Assert.Equal(VmStateWriteMode.Gather, writer.Mode);
            WriterScript.Run(writer, Script());
            writer.Close();
            server.Dispose();                                      // end of stream for the reader
        });
        using (var backend = VmStateBackend.ForStream(client, leaveOpen: true))
        using (var reader = new VmStateReader(backend, 4096))
            Assert.Equal(expected, ReadAll(reader));
        await write;
    }

    [Fact]
    public Task A_TCP_socket_carries_the_stream()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        client.Connect(listener.LocalEndPoint!);
        return CarryOverSockets(client, listener.Accept());
    }

    [Fact]
    public async Task A_Unix_socket_carries_the_stream()
    {
        using var dir = new TempDir();
        var endpoint = new UnixDomainSocketEndPoint(dir.File("s"));
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(endpoint);
        listener.Listen(1);
        var client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        client.Connect(endpoint);
        await CarryOverSockets(client, listener.Accept());
    }

    [Fact]
    public async Task A_channel_reader_gets_what_has_arrived_without_waiting_for_a_full_buffer()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var sending = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        sending.Connect(listener.LocalEndPoint!);
        using var sendBackend = VmStateBackend.ForSocket(sending);
        using var writer = new VmStateWriter(sendBackend);
        using var receiveBackend = VmStateBackend.ForSocket(listener.Accept());
        using var reader = new VmStateReader(receiveBackend, 1 << 20);

        writer.PutBe64(0x0123456789abcdef);
        writer.Flush();
        // The sender keeps the connection open: the 8 bytes must come through on their own.
        ulong first = await Task.Run(reader.GetBe64).WaitAsync(TimeSpan.FromSeconds(20));
        Assert.Equal(0x0123456789abcdefUL, first);
        writer.PutBe32(42);
        writer.Close();
        sending.Shutdown(SocketShutdown.Send);
        Assert.Equal(42u, reader.GetBe32());
        Assert.Equal(0, reader.Peek(new byte[1]));
    }

    private static async Task CarryOverSockets(Socket sending, Socket receiving)
    {
        byte[] expected = WriterScript.Reference(Script());
        var write = Task.Run(async () =>
        {
            using var backend = VmStateBackend.ForSocket(sending);
            using var writer = new VmStateWriter(backend, new VmStateWriterOptions { RateLimit = 0 });
            WriterScript.Run(writer, Script());
            await writer.CloseAsync();
            sending.Shutdown(SocketShutdown.Send);
        });
        using (var backend = VmStateBackend.ForSocket(receiving))
        using (var reader = new VmStateReader(backend, 65536))
            Assert.Equal(expected, ReadAll(reader));
        await write;
    }

    [Fact]
    public async Task CloseAsync_waits_for_every_buffered_write()
    {
        long live = AlignedBuffer.LiveCount;
        var memory = new MemoryVmStateBackend { PrefersBuffered = true };
        var backend = new FaultInjectingBackend(memory, 1) { Latency = TimeSpan.FromMilliseconds(5), MaxJitterMilliseconds = 5 };
        byte[] expected = WriterScript.Reference(Script());
        using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferCount = 4, BufferSize = 16384 }))
        {
            WriterScript.Run(writer, Script());
            await writer.CloseAsync();
            Assert.Equal(expected.Length, writer.BytesTransferred);
            Assert.Equal(1, backend.Flushes);
        }
        Assert.Equal(expected, memory.ToArray());
        Assert.Equal(live, AlignedBuffer.LiveCount);
    }
}
