using System.Diagnostics;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Vmsnap.Migration;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>
/// Real QEMU (7.2 and 10.0) is the judge of the RAM page records: a minimal migration stream around pages
/// encoded by <see cref="RamPageEncoder"/> (written by the buffered writer to an O_DIRECT file,
/// and by the gather writer to a pipe) loads into qemu-system-x86_64 and the guest RAM matches.
/// </summary>
[Trait("Category", "Unit")]
public sealed class QemuRamLoadTests
{
    private const int RamSize = 16 << 20;
    private const uint SectionId = 2;

    /// <summary>Guest RAM to send: random pages, zero pages and pages with a single non-zero byte.</summary>
    private static byte[] GuestRam()
    {
        byte[] ram = new byte[RamSize];
        var r = new Random(12345);
        for (int page = 0; page < RamSize / 4096; page++)
        {
            Span<byte> p = ram.AsSpan(page * 4096, 4096);
            switch (page % 4)
            {
                case 0: r.NextBytes(p); break;
                case 1: break; // zero
                case 2: p[r.Next(4096)] = (byte)r.Next(1, 256); break;
                default: r.NextBytes(p[..r.Next(1, 4096)]); break;
            }
        }
        return ram;
    }

    /// <summary>The migration stream around the RAM pages (framing per the design notes' stream facts).</summary>
    private static void WriteStream(VmStateWriter w, byte[] ram)
    {
        w.PutBe32(0x5145564d); // "QEVM"
        w.PutBe32(3);
        w.PutByte(0x07);       // configuration: machine type
        w.PutBe32(4);
        w.PutBuffer("none"u8);

        w.PutByte(0x01);       // section start: ram, instance 0, version 4
        w.PutBe32(SectionId);
        w.PutByte(3);
        w.PutBuffer("ram"u8);
        w.PutBe32(0);
        w.PutBe32(4);
        w.PutBe64((ulong)RamSize | 0x04);  // MEM_SIZE
        w.PutByte(4);
        w.PutBuffer("ram0"u8);
        w.PutBe64(RamSize);
        w.PutBe64(0x10);                   // EOS
        Footer(w);

        var encoder = new RamPageEncoder(w);
        // Several section parts, as QEMU cuts them: each part starts by repeating the block id.
        const int PartBytes = 4 << 20;
        for (int at = 0; at < RamSize; at += PartBytes)
        {
            w.PutByte(0x02);
            w.PutBe32(SectionId);
            encoder.ResetBlock();
            for (int chunk = at; chunk < at + PartBytes; chunk += 1 << 20)
                encoder.EncodePages("ram0", chunk, ram.AsMemory(chunk, 1 << 20));
            w.PutBe64(0x10);
            Footer(w);
        }
        Assert.Equal(RamSize / 4096, encoder.Pages);

        w.PutByte(0x03);       // section end
        w.PutBe32(SectionId);
        w.PutBe64(0x10);
        Footer(w);
        w.PutByte(0x00);       // EOF
        byte[] json = Encoding.ASCII.GetBytes("{\"page_size\": 4096, \"devices\": []}");
        w.PutByte(0x06);       // VM description
        w.PutBe32((uint)json.Length);
        w.PutBuffer(json);
    }

    private static void Footer(VmStateWriter w)
    {
        w.PutByte(0x7e);
        w.PutBe32(SectionId);
    }

    [QemuFact]
    public void QEMU_loads_RAM_pages_written_by_the_buffered_writer_to_an_O_DIRECT_file()
    {
        using var dir = new TempDir();
        byte[] ram = GuestRam();
        string stream = dir.File("stream.bin");
        using (var device = FileBlockDevice.Open(stream, new FileBlockDeviceOptions { Create = true, Direct = true }))
        using (var backend = VmStateBackend.ForBlockDevice(device))
        using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferCount = 4, BufferSize = 256 * 1024 }))
        {
            Assert.Equal(VmStateWriteMode.Buffered, writer.Mode);
            WriteStream(writer, ram);
            writer.Close();
        }
        AssertQemuLoads(dir, $"exec:cat {stream}", ram);
    }

    [QemuFact]
    public async Task QEMU_loads_RAM_pages_sent_by_the_gather_writer_through_a_pipe()
    {
        using var dir = new TempDir();
        byte[] ram = GuestRam();
        string fifo = dir.File("stream.fifo");
        Tool.Check("mkfifo", fifo);
        var send = Task.Run(() =>
        {
            using var pipe = new FileStream(fifo, FileMode.Open, FileAccess.Write);
            using var backend = VmStateBackend.ForStream(pipe);
            using var writer = new VmStateWriter(backend);
            Assert.Equal(VmStateWriteMode.Gather, writer.Mode);
            WriteStream(writer, ram);
            writer.Close();
        });
        AssertQemuLoads(dir, $"exec:cat {fifo}", ram);
        await send;
    }

    /// <summary>Starts QEMU with its RAM in a file full of garbage, lets it load the stream, and compares the RAM.</summary>
    private static void AssertQemuLoads(TempDir dir, string incoming, byte[] expected)
    {
        string ramFile = dir.File("ram.bin");
        byte[] garbage = new byte[RamSize];
        Array.Fill(garbage, (byte)0xA5);                 // zero pages must be written as zero, not skipped
        File.WriteAllBytes(ramFile, garbage);
        string qmp = dir.File("qmp.sock");
        var psi = new ProcessStartInfo(Tool.Find("qemu-system-x86_64"))
        {
            RedirectStandardError = true,
            RedirectStandardOutput = true,
            UseShellExecute = false,
        };
        foreach (string a in new[]
        {
            "-machine", "none", "-m", "16M",
            "-object", $"memory-backend-file,id=ram0,size=16M,mem-path={ramFile},share=on",
            "-machine", "memory-backend=ram0", "-nodefaults", "-display", "none",
            "-qmp", $"unix:{qmp},server=on,wait=off", "-incoming", incoming,
        }) psi.ArgumentList.Add(a);
        using var qemu = Tool.Start(psi);
        var stderr = qemu.StandardError.ReadToEndAsync();
        try
        {
            string status;
            try
            {
                status = WaitForLoad(qmp, qemu);
            }
            catch (Exception e) when (e is IOException or SocketException)
            {
                qemu.WaitForExit(TimeSpan.FromSeconds(10));
                status = $"exited ({e.Message})";
            }
            Assert.True(status is "running" or "paused", $"QEMU ended the load in state '{status}': {(qemu.HasExited ? stderr.Result : "")}");
        }
        finally
        {
            if (!qemu.HasExited && !qemu.WaitForExit(TimeSpan.FromSeconds(10))) qemu.Kill(entireProcessTree: true);
            qemu.WaitForExit();
        }
        Assert.True(qemu.ExitCode == 0, $"QEMU exited with {qemu.ExitCode}: {stderr.Result}");
        byte[] actual = File.ReadAllBytes(ramFile);
        Assert.Equal(Convert.ToHexString(SHA256.HashData(expected)), Convert.ToHexString(SHA256.HashData(actual)));
    }

    /// <summary>Polls QMP until the incoming migration is over, then quits QEMU; returns the run state it reached.</summary>
    private static string WaitForLoad(string qmpPath, Process qemu)
    {
        var deadline = Stopwatch.StartNew();
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        while (true)
        {
            try
            {
                socket.Connect(new UnixDomainSocketEndPoint(qmpPath));
                break;
            }
            catch (SocketException) when (deadline.Elapsed < TimeSpan.FromSeconds(30) && !qemu.HasExited)
            {
                Thread.Sleep(50);
            }
        }
        using var stream = new NetworkStream(socket);
        using var reader = new StreamReader(stream);
        using var writer = new StreamWriter(stream) { AutoFlush = true };
        reader.ReadLine();                                  // greeting
        Command("qmp_capabilities");
        while (true)
        {
            JsonElement reply = Command("query-status");
            string status = reply.GetProperty("return").GetProperty("status").GetString()!;
            if (status != "inmigrate")
            {
                Command("quit");
                return status;
            }
            if (deadline.Elapsed > TimeSpan.FromSeconds(60)) throw new TimeoutException("QEMU did not finish loading the stream");
            Thread.Sleep(50);
        }

        JsonElement Command(string name)
        {
            writer.WriteLine($"{{\"execute\": \"{name}\"}}");
            while (true)
            {
                string line = reader.ReadLine() ?? throw new IOException($"QEMU closed QMP during '{name}'");
                using var doc = JsonDocument.Parse(line);
                if (doc.RootElement.TryGetProperty("event", out _)) continue;
                if (doc.RootElement.TryGetProperty("error", out JsonElement error)) throw new InvalidOperationException($"QMP {name}: {error}");
                return doc.RootElement.Clone();
            }
        }
    }
}
